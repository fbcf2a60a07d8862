//! `engine`: dev mode (default), `engine demo`, `engine token`, `engine run --config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
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
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    Layout::parse(s).ok_or_else(|| format!("unknown layout `{s}`: auto, fused or per-stage"))
}

fn parse_wait(s: &str) -> Result<WaitChoice, String> {
    WaitChoice::parse(s).ok_or_else(|| {
        format!("unknown wait `{s}`: auto, busy-spin, spin-yield or spin-yield-park")
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
        Some(p) => Config::load(&p)?.jwt_secret,
        None => dev::dev_secret(&dev::dev_dir())?,
    };
    println!("{}", JwtAuth::new(secret.as_bytes()).issue(sub, roles, ttl));
    Ok(())
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
    let config = |listen| {
        let mut c = dev::dev_config(&chain.ws_url(), listen, secret.clone());
        c.layout = args.layout;
        c.wait = args.wait;
        c.audit_log = Some(dir.join("audit.jsonl"));
        c.policy_file = args.policy.clone();
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
    println!("engine dev mode");
    println!("  desk URL:   ws://{}/v1/ws", engine.local_addr());
    println!("  health:     http://{}/health", engine.local_addr());
    println!(
        "  dev chain:  {} (anvil {}, pid {})",
        chain.http_url(),
        chain.binary().display(),
        chain.pid()
    );
    println!(
        "  accounts:   dev0..dev4 (anvil keys 0-4) -> anvil accounts 5-9, up to 100 ETH per intent"
    );
    let p = engine.risk().control.policy_origin();
    println!(
        "  policy:     {p} (version {}); audit trail {}",
        engine.risk().control.active_version(),
        dir.join("audit.jsonl").display()
    );
    println!(
        "  layout:     {} usable cores, CPU stages {}, wait {:?}",
        layout.usable_cores,
        if layout.fused { "fused" } else { "per-stage" },
        layout.wait
    );
    println!("  broadcast:  {}", setup.describe());
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
                let _ = tokio::signal::ctrl_c().await;
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
