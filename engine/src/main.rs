//! `engine`: dev mode (default), `engine demo`, `engine token`, `engine run --config`,
//! `engine audit verify|export`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use alloy_primitives::Address;
use clap::{Parser, Subcommand};
use engine::audit::{AccountMatch, ExportFilter, parse_time};
use engine::auth::{JwtAuth, Roles, parse_roles};
use engine::config::{Layout, WaitChoice};
use engine::demo::{self, BroadcastSetup, DemoOptions};
use engine::stages::broadcast::MAX_PROVIDERS;
use engine::{Config, Engine, EngineError, dev};

#[derive(Parser, Debug)]
#[command(
    name = "engine",
    about = "Execution engine: desk intents to signed Ethereum transactions"
)]
struct Cli {
    /// Log line format: text or json (default: `ENGINE_LOG_FORMAT`, else text).
    #[arg(long, global = true, value_parser = parse_log_format)]
    log_format: Option<engine::LogFormat>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a dev chain and the engine on it (the default).
    Dev(DevArgs),
    /// Dev mode plus the built-in desk: a few hundred mixed intents, then latency tables.
    Demo {
        #[command(flatten)]
        dev: DevArgs,
        /// Intents to send.
        #[arg(long, default_value_t = 400)]
        intents: usize,
        /// Desk connections.
        #[arg(long, default_value_t = 4)]
        desks: usize,
        /// Intents per second, all desks together.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Where to write the report folder.
        #[arg(long, default_value = "latency-reports")]
        report_dir: PathBuf,
    },
    /// Print a JWT for a principal, signed with the dev (or configured) secret.
    Token {
        /// Principal (`sub`).
        #[arg(long)]
        sub: String,
        /// Comma-separated roles: trader, approver, admin, auditor.
        #[arg(long, default_value = "trader")]
        roles: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// Take the secret from this config file instead of the dev state folder.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run against a configured node.
    Run {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make or check the `[at_rest]` key-encryption key (see docs/journal.md).
    #[command(subcommand)]
    Kek(KekCmd),
    /// Check or read out the hash-chained audit log (see docs/audit.md).
    #[command(subcommand)]
    Audit(AuditCmd),
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check every segment of the log: each line's hash, the links between records,
    /// consecutive record numbers, the segment heads and their signatures. Exit 0 with a
    /// one-line summary; exit 1 at the first problem, naming the segment file, the line
    /// and the record number.
    Verify {
        /// The audit directory (`audit_dir`; dev mode: .engine-dev/audit).
        dir: PathBuf,
        /// Every segment head must be signed by this address (the audit key's); without
        /// it, a head signature present is still checked against its `signer`.
        #[arg(long, value_parser = parse_address)]
        signer: Option<Address>,
        /// The engine's configuration file: its `[at_rest]` key-encryption key (HSM or
        /// KMS) opens the data keys of sealed (encrypted) segments. Needed only when the
        /// log has sealed segments.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write the log's records as JSON lines (each the record's body with its `hash`
    /// added) for a SIEM or an auditor, filtered by time, account, intent and principal
    /// (every filter given must match). The chain is verified while it is read, before
    /// any line is written: a log that does not check out exports nothing and fails with
    /// the same message as `verify` and exit status 1.
    Export {
        /// The audit directory.
        dir: PathBuf,
        /// Records at or after this time: RFC 3339 (2026-12-01T06:00:00Z) or unix seconds.
        #[arg(long, value_parser = parse_time)]
        since: Option<i128>,
        /// Records before this time: RFC 3339 or unix seconds.
        #[arg(long, value_parser = parse_time)]
        until: Option<i128>,
        /// Records about this account: its address (0x…) or its configured name.
        #[arg(long)]
        account: Option<AccountMatch>,
        /// Records about the intent with this desk id.
        #[arg(long)]
        intent: Option<String>,
        /// Records submitted by this principal, or where it acted (approved, rejected,
        /// killed).
        #[arg(long)]
        principal: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// As for `verify`.
        #[arg(long, value_parser = parse_address)]
        signer: Option<Address>,
        /// As for `verify`: the configuration whose `[at_rest]` KEK opens sealed segments.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn parse_address(s: &str) -> Result<Address, String> {
    s.parse()
        .map_err(|e| format!("`{s}` is not an address (0x and 40 hex digits): {e}"))
}

#[derive(clap::Args, Debug, Clone)]
struct DevArgs {
    /// Desk listener address.
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// anvil binary (default: ENGINE_ANVIL, the project's .tools folder, then PATH).
    #[arg(long)]
    anvil: Option<PathBuf>,
    /// Dev chain block time in milliseconds.
    #[arg(long, default_value_t = 1000)]
    block_time_ms: u64,
    /// Also run the built-in desk demo (same as `engine demo`).
    #[arg(long)]
    demo: bool,
    /// Stage layout: auto, fused, per-stage.
    #[arg(long, default_value = "auto", value_parser = parse_layout)]
    layout: Layout,
    /// Stage threads' wait strategy: auto, busy-spin, spin-yield, spin-yield-park.
    #[arg(long, default_value = "auto", value_parser = parse_wait)]
    wait: WaitChoice,
    /// Policy file (TOML) instead of the dev accounts' allowlists and caps; for example
    /// config/dev-policy.toml. Reloaded on SIGHUP and with the `reload_policy` op.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Broadcast providers. More than one: that many separate WebSocket connections to the
    /// dev chain, named anvil-0, anvil-1, …, ranked and hedged as distinct providers.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_PROVIDERS as u64)
    )]
    providers: usize,
    /// Broadcast hedge delay in µs: a transaction not accepted this long after its last
    /// send also goes to the next provider (default: the configuration default).
    #[arg(long)]
    hedge_delay_us: Option<u64>,
    /// Core map: `auto` (or a core number) gives the fused CPU chain a core of its own,
    /// busy-spinning, and confines every other engine thread and the dev chain to the
    /// other cores. Absent: no core map.
    #[arg(long, value_parser = parse_hot_core)]
    hot_core: Option<engine::config::HotCore>,
    /// Journal sync policy: `none` (page cache: survives a crash of the process), `group`
    /// (acks and broadcasts wait for fsync, group commit) or `interval`. The dev journal is
    /// `<dev dir>/journal`, started empty each time (the dev chain is new each time).
    /// `off` runs without a journal (acks are not durable; for comparison runs).
    #[arg(long, default_value = "none", value_parser = parse_sync)]
    journal_sync: JournalMode,
}

/// The dev journal: off, or on with a sync policy.
#[derive(Clone, Copy, Debug)]
struct JournalMode(Option<engine::config::JournalSync>);

fn parse_sync(s: &str) -> Result<JournalMode, String> {
    use engine::config::JournalSync;
    match s {
        "none" => Ok(JournalMode(Some(JournalSync::None))),
        "group" => Ok(JournalMode(Some(JournalSync::Group))),
        "interval" => Ok(JournalMode(Some(JournalSync::Interval))),
        "off" => Ok(JournalMode(None)),
        _ => Err(format!(
            "unknown journal sync `{s}`: none, group, interval or off"
        )),
    }
}

fn parse_hot_core(s: &str) -> Result<engine::config::HotCore, String> {
    engine::config::HotCore::parse(s)
        .ok_or_else(|| format!("unknown hot core `{s}`: auto or a core number"))
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::parse(s).ok_or_else(|| format!("unknown layout `{s}`: auto, fused or per-stage"))
}

fn parse_wait(s: &str) -> Result<WaitChoice, String> {
    WaitChoice::parse(s).ok_or_else(|| {
        format!("unknown wait `{s}`: auto, busy-spin, spin-yield or spin-yield-park")
    })
}

fn parse_log_format(s: &str) -> Result<engine::LogFormat, String> {
    engine::LogFormat::parse(s).ok_or_else(|| format!("unknown log format `{s}`: text or json"))
}

fn main() -> ExitCode {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let cli = Cli::parse();
    let format = match cli.log_format {
        Some(f) => f,
        None => match std::env::var("ENGINE_LOG_FORMAT") {
            Ok(v) if !v.is_empty() => match engine::LogFormat::parse(&v) {
                Some(f) => f,
                None => {
                    eprintln!("ENGINE_LOG_FORMAT: unknown log format `{v}`: text or json");
                    return ExitCode::from(2);
                }
            },
            _ => engine::LogFormat::Text,
        },
    };
    engine::log_subscriber(
        format,
        std::env::var("RUST_LOG").ok().as_deref(),
        std::io::stderr,
    )
    .init();
    let res = match cli.cmd.unwrap_or(Cmd::Dev(DevArgs {
        listen: "127.0.0.1:7300"
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7300))),
        anvil: None,
        block_time_ms: 1000,
        demo: false,
        layout: Layout::Auto,
        wait: WaitChoice::Auto,
        policy: None,
        providers: 1,
        hedge_delay_us: None,
        journal_sync: JournalMode(Some(engine::config::JournalSync::None)),
        hot_core: None,
    })) {
        Cmd::Dev(args) => {
            let demo = args.demo.then(DemoOptions::default);
            dev_mode(args, demo)
        }
        Cmd::Demo {
            dev,
            intents,
            desks,
            rate,
            report_dir,
        } => dev_mode(
            dev,
            Some(DemoOptions {
                intents,
                desks,
                rate_per_sec: rate,
                report_root: Some(report_dir),
                ..DemoOptions::default()
            }),
        ),
        Cmd::Token {
            sub,
            roles,
            ttl,
            config,
        } => token(&sub, &roles, ttl, config),
        Cmd::Run { config } => run(config),
        Cmd::Audit(cmd) => return audit(cmd),
        Cmd::Kek(cmd) => kek(cmd),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(sub: &str, roles: &str, ttl: u64, config: Option<PathBuf>) -> Result<(), EngineError> {
    let roles = parse_roles(roles).map_err(|e| EngineError::Config {
        what: format!("--roles: {e}"),
    })?;
    let secret = match config {
        Some(p) => Config::load(&p)?.jwt_secret.0,
        None => dev::dev_secret(&dev::dev_dir())?,
    };
    println!("{}", JwtAuth::new(secret.as_bytes()).issue(sub, roles, ttl));
    Ok(())
}

/// `engine kek …`.
#[derive(Subcommand, Debug)]
enum KekCmd {
    /// Create the key-encryption key the configuration's `[at_rest] kek` names: an AES-256
    /// key inside the PKCS#11 token, or a new symmetric KMS key (its id is printed).
    Generate {
        /// The engine's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Open the configured key-encryption key and wrap and unwrap a probe key with it.
    Check {
        /// The engine's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn kek(cmd: KekCmd) -> Result<(), EngineError> {
    let (KekCmd::Generate { config } | KekCmd::Check { config }) = &cmd;
    let cfg = Config::load(config)?;
    let Some(at_rest) = &cfg.at_rest else {
        return Err(EngineError::Config {
            what: format!("{}: no [at_rest] section", config.display()),
        });
    };
    let signer_err = |source| EngineError::Signer {
        account: "at_rest.kek".into(),
        source,
    };
    match cmd {
        KekCmd::Generate { .. } => {
            println!(
                "{}",
                engine::custody::generate_kek(&at_rest.kek).map_err(signer_err)?
            );
        }
        KekCmd::Check { .. } => {
            let kek = engine::custody::kek(&at_rest.kek).map_err(signer_err)?;
            println!("{}: wraps and unwraps", kek.id());
        }
    }
    Ok(())
}

/// `engine audit …`: 0 when the log checks out, 1 (with the problem on stderr) when not.
fn audit(cmd: AuditCmd) -> ExitCode {
    /// The sealer of the `[at_rest]` section of the configuration at `config` (none without
    /// a configuration, or without the section).
    fn audit_sealer(
        config: Option<&std::path::Path>,
    ) -> Result<Option<engine::atrest::Sealer>, EngineError> {
        match config {
            None => Ok(None),
            Some(path) => engine::custody::sealer(&Config::load(path)?),
        }
    }

    /// What to add to a break that needs a key-encryption key none was given for.
    fn no_kek_hint(problem: &engine::audit::Problem, config: Option<&std::path::Path>) -> String {
        match (problem, config) {
            (engine::audit::Problem::NoKek { .. }, None) => {
                "\nthe log has sealed segments: pass --config <engine configuration file> so that its [at_rest] key-encryption key (HSM or KMS) opens them".into()
            }
            (engine::audit::Problem::NoKek { .. }, Some(c)) => {
                format!("\n{} has no [at_rest] section", c.display())
            }
            _ => String::new(),
        }
    }

    match cmd {
        AuditCmd::Verify {
            dir,
            signer,
            config,
        } => {
            let sealer = match audit_sealer(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("engine audit verify: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match engine::audit::verify(&dir, signer, sealer.as_ref()) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(b) => {
                    let hint = no_kek_hint(&b.problem, config.as_deref());
                    eprintln!("engine audit verify: {b}{hint}");
                    ExitCode::FAILURE
                }
            }
        }
        AuditCmd::Export {
            dir,
            since,
            until,
            account,
            intent,
            principal,
            out,
            signer,
            config,
        } => {
            let sealer = match audit_sealer(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("engine audit export: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let filter = ExportFilter {
                since_ns: since,
                until_ns: until,
                account,
                intent,
                principal,
            };
            let mut sink: Box<dyn std::io::Write> = match &out {
                Some(p) => match std::fs::File::create(p) {
                    Ok(f) => Box::new(std::io::BufWriter::new(f)),
                    Err(e) => {
                        eprintln!("engine audit export: {}: {e}", p.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            match engine::audit::export(&dir, &filter, signer, sealer.as_ref(), &mut sink) {
                Ok(s) => {
                    eprintln!("exported {} records; {}", s.exported, s.log);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = sink.flush();
                    let hint = match &e {
                        engine::audit::ExportError::Break(b) => {
                            no_kek_hint(&b.problem, config.as_deref())
                        }
                        engine::audit::ExportError::Write(_) => String::new(),
                    };
                    eprintln!("engine audit export: {e}{hint}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: PathBuf) -> Result<(), EngineError> {
    let cfg = Config::load(&config)?;
    let engine = Engine::start(cfg)?;
    println!("desk URL: ws://{}/v1/ws", engine.local_addr());
    wait_for_stop(&engine, None);
    engine.shutdown()
}

fn dev_mode(args: DevArgs, demo: Option<DemoOptions>) -> Result<(), EngineError> {
    let dir = dev::dev_dir();
    let secret = dev::dev_secret(&dir)?;
    let mut chain = dev::start_chain(
        args.anvil.as_deref(),
        Duration::from_millis(args.block_time_ms.max(1)),
    )?;
    let listen = args.listen;
    // The dev chain is new, so is the dev journal: what an earlier run left refers to
    // transactions of a chain that is gone.
    let journal_dir = dir.join("journal");
    if journal_dir.exists() {
        std::fs::remove_dir_all(&journal_dir)?;
    }
    let staking = dev::dev_staking(&chain)?;
    let config = |listen| {
        let mut c = dev::dev_config(&chain.ws_url(), listen, secret.clone());
        c.staking = Some(staking.clone());
        c.layout = args.layout;
        c.wait = args.wait;
        c.audit_dir = Some(dir.join("audit"));
        c.policy_file = args.policy.clone();
        c.journal = args
            .journal_sync
            .0
            .map(|sync| engine::config::JournalSettings {
                dir: journal_dir.clone(),
                segment_bytes: 64 << 20,
                sync,
                group_commit_us: 200,
                interval_ms: 10,
                compact_every_ms: 10_000,
            });
        c.hot_core = args.hot_core;
        c.providers = dev::dev_providers(&chain.ws_url(), args.providers);
        if let Some(us) = args.hedge_delay_us {
            c.broadcast.hedge_delay_us = us;
        }
        c
    };
    let setup = BroadcastSetup::of(&config(listen));
    let engine = match Engine::start(config(listen)) {
        Ok(e) => e,
        Err(EngineError::Listen { .. }) if listen.port() != 0 => {
            // The default port is taken: take any free one and say so.
            let any = SocketAddr::new(listen.ip(), 0);
            eprintln!("engine: {listen} is in use; listening on a free port instead");
            Engine::start(config(any))?
        }
        Err(e) => return Err(e),
    };
    let token = JwtAuth::new(secret.as_bytes()).issue("dev", Roles::all(), 7 * 86_400);
    let layout = engine.layout();
    // The dev chain shares this machine: off the hot core too.
    if let Some(map) = &layout.core_map {
        pipeline::confine_threads(Some(chain.pid()), &map.rest)?;
    }
    println!("engine dev mode");
    println!("  desk URL:   ws://{}/v1/ws", engine.local_addr());
    println!("  health:     http://{}/health", engine.local_addr());
    println!("  dashboard:  http://{}/dashboard", engine.local_addr());
    println!(
        "  dev chain:  {} (anvil {}, pid {})",
        chain.http_url(),
        chain.binary().display(),
        chain.pid()
    );
    println!(
        "  accounts:   dev0..dev4 (anvil keys 0-4) -> anvil accounts 5-9, up to 100 ETH per intent"
    );
    println!(
        "  staking:    deposit contract {}, batch {}, fork {} (dev accounts withdraw to themselves)",
        staking.deposit_contract,
        staking.batch_contract.unwrap_or_default(),
        staking.genesis_fork_version
    );
    let p = engine.risk().control.policy_origin();
    println!(
        "  policy:     {p} (version {})",
        engine.risk().control.active_version()
    );
    println!(
        "  audit log:  {0} (check it: engine audit verify {0})",
        dir.join("audit").display()
    );
    println!("  layout:     {}", layout.describe());
    println!("  broadcast:  {}", setup.describe());
    match args.journal_sync.0 {
        Some(sync) => println!(
            "  journal:    {} (sync {})",
            journal_dir.display(),
            sync.as_str()
        ),
        None => println!("  journal:    off (acks are not durable)"),
    }
    println!("  JWT (principal `dev`, every role, 7 days):\n{token}");
    println!("  more tokens: engine token --sub NAME --roles trader,approver");
    if let Some(mut opts) = demo {
        opts.broadcast = Some(setup);
        let outcome = demo::run(&engine, &token, &opts)
            .map_err(|e| EngineError::DevChain(format!("demo desk: {e}")))?;
        println!("\n{}", outcome.text);
        let failed = engine.failure();
        engine.shutdown()?;
        drop(chain);
        if let Some(f) = failed {
            return Err(EngineError::DevChain(format!(
                "pipeline failed during the demo: {f}"
            )));
        }
        if outcome.unsettled > 0 || outcome.failed > 0 {
            return Err(EngineError::DevChain(format!(
                "demo: {} intents did not settle and {} ended otherwise than expected",
                outcome.unsettled, outcome.failed
            )));
        }
        return Ok(());
    }
    println!("Ctrl-C to stop.");
    wait_for_stop(&engine, Some(&mut chain));
    engine.shutdown()
}

/// Blocks until Ctrl-C, a failed pipeline, or (dev mode) the dev chain exiting.
fn wait_for_stop(engine: &Engine, mut chain: Option<&mut venues::Anvil>) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = rt {
        std::thread::spawn(move || {
            rt.block_on(async {
                // Ctrl-C or SIGTERM (what a service manager sends): a clean stop, with the
                // journal synced.
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            });
            let _ = tx.send(());
        });
    }
    loop {
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            eprintln!("engine: stopping");
            return;
        }
        if let Some(f) = engine.failure() {
            eprintln!("engine: pipeline failed: {f}");
            return;
        }
        if let Some(c) = chain.as_deref_mut()
            && let Some(status) = c.exited()
        {
            eprintln!("engine: the dev chain exited ({status}); stopping");
            return;
        }
    }
}
