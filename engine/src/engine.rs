//! Assembly: builds the rings, the stages and their threads, the desk listener, and owns
//! them until shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline::{
    CoreBudget, CoreMap, Input, LatencyRegistry, ManyToOneProducer, Output, Pipeline,
    PipelineBuilder, ThreadConfig, WaitKind, fuse, many_to_one, one_to_one,
};
use venues::{FeeView, RpcClient};

use crate::auth::{JwtAuth, Principals};
use crate::blob::BlobPool;
use crate::config::JournalSync;
use crate::config::{Config, Layout, WaitChoice};
use crate::custody::Custody;
use crate::error::EngineError;
use crate::journal::{Journal, JournalConfig, SyncPolicy};
use crate::msg::{AccountIdx, IntentMsg, StatusMsg, TxMsg};
use crate::recovery::{Plan, Recovered};
use crate::risk::audit::{AuditStats, StatusAudit};
use crate::risk::staking::{RequestFees, StakingNet};
use crate::risk::{self, RiskAdmin};
use crate::server::{self, Health, ServerCtx};
use crate::stages::StatusSink;
use crate::stages::broadcast::{
    BroadcastRecorders, BroadcastStage, BroadcastStats, ProviderSpec, RelaySpec,
};
use crate::stages::intake::IntakeJournal;
use crate::stages::intake::IntakeStage;
use crate::stages::policy::PolicyStage;
use crate::stages::receipts::{ReceiptsStage, ReceiptsStats};
use crate::stages::signing::{SigningAccount, SigningStage};
use crate::stages::status::StatusJournal;
use crate::stages::status::{Counters, StatusStage};
use crate::staking::chain::{RefreshStats, Refresher};
use crate::staking::verifier::DepositVerifier;

/// How the engine laid its stages out on threads, for reports.
#[derive(Clone, Debug)]
pub struct LayoutReport {
    /// Cores the process may use.
    pub usable_cores: usize,
    /// Whether intake, policy and signing run fused on one thread.
    pub fused: bool,
    /// Wait strategy of the stage threads.
    pub wait: WaitKind,
    /// Thread names, in pipeline order.
    pub threads: Vec<String>,
    /// With `hot_core`: the CPU chain's core (busy-spinning there) and the cores every
    /// other thread is confined to.
    pub core_map: Option<CoreMap>,
}

impl LayoutReport {
    /// One line for reports: cores, layout, wait strategies, core map.
    pub fn describe(&self) -> String {
        let stages = if self.fused { "fused" } else { "per-stage" };
        match &self.core_map {
            None => format!(
                "{} usable cores, CPU stages {stages}, wait {}, no core map",
                self.usable_cores,
                self.wait.as_str()
            ),
            Some(m) => format!(
                "{} usable cores, CPU stages {stages} on hot core {} (busy-spin), every other thread on cores {:?} (wait {})",
                self.usable_cores,
                m.hot,
                m.rest,
                self.wait.as_str()
            ),
        }
    }
}

/// A running engine.
pub struct Engine {
    pipeline: Arc<Mutex<Option<Pipeline>>>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: tokio::sync::watch::Sender<bool>,
    addr: SocketAddr,
    latency: LatencyRegistry,
    health: Arc<Health>,
    dead: Arc<AtomicBool>,
    layout: LayoutReport,
    counters: Arc<Counters>,
    risk: Arc<RiskAdmin>,
    risk_stop: Arc<AtomicBool>,
    audit_stats: Arc<AuditStats>,
    journal: Option<Journal>,
    tls: Option<Arc<crate::tls::TlsReloader>>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("addr", &self.addr)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts everything: reads chain id, fees and nonces from the node, spawns the stage
    /// threads, binds the desk listener.
    pub fn start(cfg: Config) -> Result<Engine, EngineError> {
        cfg.validate()?;
        // Certificates first: a bad file fails the start before anything runs.
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(crate::tls::TlsReloader::load(t.clone())?)),
            None => None,
        };
        // The core map first, before this start spawns any thread: detected on the whole
        // mask, then every thread of the process is moved off the hot core, and threads
        // made from here on inherit that.
        let budget = CoreBudget::detect();
        let core_map = match cfg.hot_core {
            None => None,
            Some(h) => {
                let map = CoreMap::isolate(&budget, h.core())?;
                let moved = pipeline::confine_threads(None, &map.rest)?;
                tracing::info!(hot = map.hot, rest = ?map.rest, threads = moved, "core map: the hot core is kept for the CPU chain");
                Some(map)
            }
        };
        // The relay-auth key (refused if its file is readable by others).
        let relay_auth = cfg.relay_auth()?;

        // Warm state, read once, off the hot path.
        let mut rpc = RpcClient::connect(&cfg.node_ws_url)?;
        let chain_id = rpc.chain_id()?;
        let fees = Arc::new(FeeView::new(rpc.fee_estimate()?));
        // The head's number too: a private send's `maxBlockNumber` counts from it.
        fees.store_at(fees.load(), rpc.block_number()?);
        let custody = Custody::build(&cfg)?;
        let names: Vec<String> = cfg.accounts.iter().map(|a| a.name.clone()).collect();
        let custody_view = Arc::new(custody.view(&names));
        let mut accounts = Vec::with_capacity(custody.accounts.len());
        let mut quorum = Vec::with_capacity(custody.accounts.len());
        for a in custody.accounts {
            let from = a.signer.address();
            let next_nonce = rpc.transaction_count(from, "pending")?;
            quorum.push(a.approvals);
            accounts.push(SigningAccount {
                signer: a.signer,
                worker_index: a.worker_index,
                from,
                next_nonce,
            });
        }
        // The journal: replayed, checked against the chain, compacted, then reopened for
        // this run's records.
        let principals = Arc::new(Principals::default());
        let addresses: Vec<alloy_primitives::Address> = accounts.iter().map(|a| a.from).collect();
        // Encryption at rest: one KEK (HSM or KMS) seals journal and audit segments.
        let sealer = crate::custody::sealer(&cfg)?;
        let recovery = match &cfg.journal {
            None => None,
            Some(js) => {
                let (journal, replay) = Journal::open(JournalConfig {
                    dir: js.dir.clone(),
                    segment_bytes: js.segment_bytes,
                    sync: match js.sync {
                        JournalSync::None => SyncPolicy::None,
                        JournalSync::Group => SyncPolicy::Group {
                            max_delay_us: js.group_commit_us,
                        },
                        JournalSync::Interval => SyncPolicy::Interval { ms: js.interval_ms },
                    },
                    sealer: sealer.clone(),
                })?;
                let recovered = Recovered::from_replay(&replay, &addresses);
                drop(replay);
                if recovered.unnamed > 0 {
                    tracing::error!(
                        intents = recovered.unnamed,
                        "the journal holds intents whose principal no record names; they are kept, but their desk cannot look them up by id"
                    );
                }
                let mut plan = recovered
                    .plan(&principals, |h| rpc.receipt(h).map_err(|e| e.to_string()))
                    .map_err(EngineError::Recovery)?;
                // What the chain does not have goes to the node again now, in nonce
                // order, before any new transaction can.
                let rpc_cell = std::cell::RefCell::new(&mut rpc);
                plan.send_again(
                    |raw| {
                        rpc_cell
                            .borrow_mut()
                            .send_raw_transaction(raw)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    },
                    |h| rpc_cell.borrow_mut().receipt(h).map_err(|e| e.to_string()),
                )
                .map_err(EngineError::Recovery)?;
                journal.compact(recovered.keep_records(|name| principals.intern(name)))?;
                if !recovered.entries.is_empty() {
                    tracing::info!(
                        intents = recovered.entries.len(),
                        reprocessed = plan.reinject.len(),
                        included = plan.included.len(),
                        resent = plan.watch.len(),
                        failed = plan.fail.len(),
                        torn = recovered.torn,
                        "recovered from the journal"
                    );
                }
                Some((journal, plan, recovered.next_seq()))
            }
        };
        drop(rpc);

        let blobs = Arc::new(BlobPool::new(cfg.blob_slots));
        let dead = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let cap = cfg.ring_capacity;

        let (intake_tx, intake_rx) = many_to_one::<IntentMsg>(cap);
        let (status_tx, status_rx) = many_to_one::<StatusMsg>(cfg.status_ring_capacity);
        // Broadcast hands hashes to the receipt watcher without waking it: the watcher is
        // woken by its subscription socket and drains this ring on every wake (it also
        // keeps recent blocks' receipts for hashes that arrive after their block), so a
        // wake-up per transaction would only cost the hot thread its core on a small box.
        let (rc_tx, rc_rx) = one_to_one::<TxMsg>(cap);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        // Each ring is named after the stage that consumes it.
        let mut rings = vec![
            ("intake", intake_rx.probe()),
            ("status", status_rx.probe()),
            ("receipts", rc_rx.probe()),
        ];
        let status = StatusSink::new(status_tx, Arc::clone(&dead));

        let mut builder = PipelineBuilder::with_core_budget(budget.clone());
        let latency = builder.latency().clone();
        let fused = match cfg.layout {
            Layout::Auto => budget.usable_cores() < Layout::PER_STAGE_MIN_CORES,
            Layout::Fused => true,
            Layout::PerStage => false,
        };
        // Threads that want a core: the CPU stages with broadcast (1 fused, or 4), receipts,
        // status.
        let stage_threads = if fused { 3 } else { 6 };
        let wait = match cfg.wait {
            WaitChoice::Auto => budget.default_wait(stage_threads),
            WaitChoice::BusySpin => WaitKind::BusySpin,
            WaitChoice::SpinYield => WaitKind::SpinThenYield,
            WaitChoice::SpinYieldPark => WaitKind::SpinYieldPark,
        };
        let mut intake = IntakeStage::new(status.clone(), Arc::clone(&blobs), 1 << 16);
        // The risk engine: kill switch, audit trail, policy (file or configuration),
        // four-eyes pending set.
        let mut parts = risk::assemble(
            &cfg,
            intake_tx.clone(),
            status.clone(),
            Arc::clone(&blobs),
            Arc::clone(&principals),
            sealer,
        )?;
        let kill = Arc::clone(&parts.admin.kill);
        let risk_admin = Arc::clone(&parts.admin);
        let risk_stop = Arc::clone(&parts.stop);
        let audit_stats = Arc::clone(&parts.audit_stats);
        // `private` (and `auto` resolved to it) needs a relay.
        parts.risk.set_private_relay(relay_auth.is_some());
        // Staking: the network's contracts and fork, and the chain's validators and request
        // fees as they are now (read before the first intent is decided).
        let staking = match &cfg.staking {
            None => None,
            Some(st) => {
                let net = StakingNet::from_config(st, Arc::new(RequestFees::unknown()))?;
                let ours: std::collections::HashSet<alloy_primitives::Address> = cfg
                    .accounts
                    .iter()
                    .flat_map(|a| a.staking_withdrawal.iter().copied())
                    .chain(addresses.iter().copied())
                    .collect();
                let stats = Arc::new(RefreshStats::default());
                let mut refresher = Refresher::new(
                    cfg.node_ws_url.clone(),
                    &net,
                    st.deposit_contract_block,
                    ours,
                    Arc::clone(&stats),
                );
                let set = refresher.prime()?;
                parts.risk.set_staking(net.clone(), addresses.clone());
                drop(parts.risk.swap_validators(set));
                Some((st.clone(), net, refresher, stats))
            }
        };
        let mut policy = PolicyStage::new(
            parts.risk,
            parts.link,
            parts.pending,
            parts.audit,
            status.clone(),
            Arc::clone(&blobs),
            quorum,
        );
        // Deposits' signatures and roots are checked on their own thread.
        let mut exit_notices = None;
        let mut staking_stats = None;
        if let Some((_, net, _, refresh)) = &staking {
            let verifier_stats = Arc::new(crate::staking::verifier::VerifierStats::default());
            staking_stats = Some(crate::staking::StakingStats {
                refresh: Arc::clone(refresh),
                verifier: Arc::clone(&verifier_stats),
                fees: Arc::clone(&net.fees),
            });
            let (vtx, vrx) = crossbeam_channel::bounded(1024);
            policy.set_verifier(vtx);
            let (etx, erx) = crossbeam_channel::bounded(1024);
            policy.set_exit_notices(etx);
            exit_notices = Some(erx);
            DepositVerifier {
                inbox: vrx,
                intake: intake_tx.clone(),
                status: status.clone(),
                blobs: Arc::clone(&blobs),
                audit: risk_admin.audit.clone(),
                fork_version: net.fork_version,
                stats: verifier_stats,
            }
            .spawn(Arc::clone(&risk_stop))?;
        }
        let mut signing = SigningStage::new(
            accounts,
            custody.asynced,
            chain_id,
            Arc::clone(&fees),
            Arc::clone(&blobs),
            status.clone(),
            latency.recorder("signing.sign_call"),
            Arc::clone(&kill),
        );
        let provider_list = cfg.provider_list();
        let provider_names: Vec<String> = provider_list.iter().map(|(n, _)| n.clone()).collect();
        let mut specs = Vec::with_capacity(provider_list.len());
        for (name, ws_url) in provider_list {
            let venue = kill.venue_slot(&name).unwrap_or(0);
            specs.push(ProviderSpec {
                name,
                ws_url,
                venue,
            });
        }
        let relay_names: Vec<String> = cfg.relays.iter().map(|r| r.name.clone()).collect();
        let relay_specs: Vec<RelaySpec> = cfg
            .relays
            .iter()
            .map(|r| RelaySpec {
                name: r.name.clone(),
                url: r.url.clone(),
                venue: kill.venue_slot(&r.name).unwrap_or(0),
            })
            .collect();
        let broadcast_stats = Arc::new(BroadcastStats::with_relays(&provider_names, &relay_names));
        let mut broadcast = BroadcastStage::connect(
            &specs,
            cfg.broadcast.tuning(),
            Arc::clone(&blobs),
            status.clone(),
            BroadcastRecorders::standard(&latency),
            cap,
            Arc::clone(&kill),
            Arc::clone(&broadcast_stats),
        )?;
        if let Some(auth) = &relay_auth {
            broadcast = broadcast.with_relays(&relay_specs, auth, Arc::clone(&fees))?;
        }
        // The head subscription: on the node, resumed on the providers in turn if lost.
        let mut head_urls = vec![cfg.node_ws_url.clone()];
        for p in &cfg.providers {
            if !head_urls.contains(&p.ws_url) {
                head_urls.push(p.ws_url.clone());
            }
        }
        let receipts_stats = Arc::new(ReceiptsStats::default());
        let mut receipts = ReceiptsStage::connect(
            head_urls,
            Arc::clone(&fees),
            cfg.confirmations,
            status.clone(),
            latency.recorder("e2e.ws_to_included"),
            cap,
            Arc::clone(&blobs),
            Arc::clone(&receipts_stats),
        )?;
        if let Some((st, _, _, _)) = &staking {
            receipts.set_deposit_contract(st.deposit_contract);
        }
        // Reorged transactions go back through broadcast, byte for byte.
        receipts.set_resend(broadcast.resend_handle());
        // Venue bits: the providers, then the relays.
        let venue_names: Vec<String> = provider_names.into_iter().chain(relay_names).collect();
        let mut status_stage = StatusStage::new(control_rx, venue_names, Arc::clone(&counters));
        // Requests, signatures, broadcasts and receipts go to the audit trail from here.
        let audited: Vec<_> = custody_view
            .accounts
            .iter()
            .map(|a| a.signer.address())
            .collect();
        status_stage.set_audit(StatusAudit::new(risk_admin.audit.clone(), &audited));
        // After signing: cancellations from desks, stuck and settled transactions from the
        // receipt watcher, nonces no provider took from broadcast.
        signing.set_reconcile(cfg.node_ws_url.clone())?;
        let notices = signing.notices();
        status_stage.set_notices(notices.clone());
        receipts.set_notices(notices.clone(), cfg.broadcast.stuck_blocks);
        broadcast.set_notices(notices);
        // Journal lanes, and what the journal says each stage starts with.
        if let Some((journal, plan, next_seq)) = &recovery {
            let intake_lane = journal.lane("intake")?;
            let signing_lane = journal.lane("signing")?;
            let status_wake: crate::stages::signing::WakeCell = Arc::default();
            status_stage.set_journal(StatusJournal {
                lane: journal.lane("events")?,
                intake: intake_lane.durable(),
                held: std::collections::VecDeque::with_capacity(cap),
                wake: Arc::clone(&status_wake),
            });
            broadcast.set_journal(signing_lane.durable());
            {
                let waker = broadcast.waker();
                journal.on_durable(Box::new(move || {
                    let _ = waker.wake();
                    if let Some(s) = status_wake.get() {
                        s.notify();
                    }
                }));
            }
            intake.set_journal(IntakeJournal {
                lane: intake_lane,
                principals: Arc::clone(&principals),
                accounts: addresses.clone(),
                named: std::collections::HashSet::new(),
            });
            signing.set_journal(signing_lane);
            intake.recover(plan.keys.iter().copied(), *next_seq);
            // The audit trail names a recovered intent's later records as a live one's:
            // every unfinished one by id, and with its account where the plan has it.
            let none = alloy_primitives::B256::ZERO;
            for (seq, principal, id, last) in &plan.known {
                status_stage.recover(*seq, *principal, *id, *last);
                if !last.as_ref().is_some_and(|(m, _)| m.state.is_terminal()) {
                    status_stage.recover_audit(*seq, *id, *principal, AccountIdx::UNKNOWN, none);
                }
            }
            let recovered = plan
                .live
                .iter()
                .map(|(m, _, s)| (m, s.tx_hash))
                .chain(plan.included.iter().map(|i| (&i.msg, i.receipt.tx_hash)))
                .chain(plan.reinject.iter().map(|(m, _)| (m, none)));
            for (m, tx) in recovered {
                status_stage.recover_audit(m.seq, m.id, m.origin.principal, m.account, tx);
            }
            for (msg, data, s) in &plan.live {
                let mut m = *msg;
                m.data = claim_blob(&blobs, data)?;
                signing.recover(m, s.nonce, s.max_fee, s.tip, s.generation);
            }
            for (msg, tx) in &plan.watch {
                receipts.recover_watch(
                    msg.seq,
                    msg.origin,
                    msg.account,
                    tx.nonce,
                    tx.tx_hash,
                    tx.purpose,
                    tx.generation,
                    tx.raw.clone(),
                );
            }
            for h in &plan.unsure {
                receipts.recover_verify(*h);
            }
            for inc in &plan.included {
                receipts.recover_included(
                    inc.msg.seq,
                    inc.msg.origin,
                    inc.msg.account,
                    inc.tx.nonce,
                    inc.receipt.tx_hash,
                    inc.receipt.block_number,
                    inc.receipt.block_hash,
                    inc.tx.raw.clone(),
                    inc.announce.then_some(inc.receipt),
                );
            }
        }

        let mut threads: Vec<String> = Vec::new();
        let mut next = |name: &str| {
            threads.push(name.to_owned());
            ThreadConfig {
                name: name.to_owned(),
                core: cfg.pin_cores.get(threads.len() - 1).copied(),
                wait,
            }
        };
        if fused {
            // Few cores: the CPU stages and the socket write run as one chain of direct
            // calls; the thread parks on the node socket's poller, which the intake ring
            // also wakes. With a core map it owns the hot core and spins instead.
            let cpu = fuse(fuse(fuse(intake, policy), signing), broadcast);
            let mut cpu_thread = next("cpu");
            if let Some(map) = &core_map {
                cpu_thread.core = Some(map.hot);
                cpu_thread.wait = WaitKind::BusySpin;
            }
            builder.spawn(
                cpu_thread,
                Input::ManyToOne(intake_rx),
                cpu,
                Output::OneToOneLazy(rc_tx),
            )?;
        } else {
            let (p_tx, p_rx) = one_to_one::<IntentMsg>(cap);
            let (s_tx, s_rx) = one_to_one::<IntentMsg>(cap);
            let (bc_tx, bc_rx) = one_to_one::<TxMsg>(cap);
            rings.extend([
                ("policy", p_rx.probe()),
                ("signing", s_rx.probe()),
                ("broadcast", bc_rx.probe()),
            ]);
            builder.spawn(
                next("intake"),
                Input::ManyToOne(intake_rx),
                intake,
                Output::OneToOne(p_tx),
            )?;
            builder.spawn(
                next("policy"),
                Input::OneToOne(p_rx),
                policy,
                Output::OneToOne(s_tx),
            )?;
            builder.spawn(
                next("signing"),
                Input::OneToOne(s_rx),
                signing,
                Output::OneToOne(bc_tx),
            )?;
            builder.spawn(
                next("broadcast"),
                Input::OneToOne(bc_rx),
                broadcast,
                Output::OneToOneLazy(rc_tx),
            )?;
        }
        builder.spawn(
            next("receipts"),
            Input::OneToOne(rc_rx),
            receipts,
            Output::Discard,
        )?;
        builder.spawn(
            next("status"),
            Input::ManyToOne(status_rx),
            status_stage,
            Output::Discard,
        )?;
        let pipeline = Arc::new(Mutex::new(Some(builder.start())));
        // Recovered work goes back in through the same rings and handles as any other.
        let journal = match recovery {
            Some((journal, plan, _)) => {
                spawn_resume(
                    plan,
                    status.clone(),
                    intake_tx.clone(),
                    Arc::clone(&blobs),
                    Arc::clone(&risk_stop),
                )?;
                let every = cfg.journal.as_ref().map_or(0, |j| j.compact_every_ms);
                if every > 0 {
                    spawn_compactor(
                        journal.clone(),
                        Arc::clone(&principals),
                        addresses.clone(),
                        Duration::from_millis(every),
                        Arc::clone(&risk_stop),
                    )?;
                }
                Some(journal)
            }
            None => None,
        };

        // Desk listener.
        let health = Arc::new(Health {
            chain_id,
            broadcast: Some(Arc::clone(&broadcast_stats)),
            receipts: Some(Arc::clone(&receipts_stats)),
            journal: journal.clone(),
            staking: staking_stats,
            rings,
            ..Health::default()
        });
        let std_listener =
            std::net::TcpListener::bind(cfg.listen).map_err(|source| EngineError::Listen {
                addr: cfg.listen,
                source,
            })?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads)
            .thread_name("desk-io")
            .enable_all()
            .build()?;
        let listener = {
            let _g = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let account_index = cfg.account_indices();
        // The staking refresher (request fees, deposit logs) and validator watch.
        if let Some((st, _, refresher, stats)) = staking {
            let (updates, retired) = risk_admin.control.update_handles();
            let on_tick = crate::staking::watch::on_tick(
                &st,
                control_tx.clone(),
                exit_notices
                    .take()
                    .unwrap_or_else(|| crossbeam_channel::bounded(1).1),
                stats,
            )?;
            refresher.spawn(
                Duration::from_millis(st.refresh_ms),
                updates,
                retired,
                Arc::clone(&risk_stop),
                on_tick,
            )?;
        }
        let mut ctx = ServerCtx::new(
            JwtAuth::with_previous(
                cfg.jwt_secret.0.as_bytes(),
                &cfg.jwt_previous_secrets
                    .iter()
                    .map(|s| s.0.as_bytes())
                    .collect::<Vec<_>>(),
            ),
            Arc::new(crate::limits::Limits::new(cfg.limits.clone())),
            intake_tx,
            status.clone(),
            control_tx,
            Arc::clone(&blobs),
            account_index,
            latency.clone(),
            Arc::clone(&counters),
            Arc::clone(&health),
            principals,
            Arc::clone(&risk_admin),
            custody_view,
        );
        ctx.slow_reader = server::SlowReader {
            queue: cfg.limits.outbound_queue as usize,
            stall: Duration::from_millis(cfg.limits.write_stall_ms.into()),
        };
        ctx.monitor = crate::monitor::MonitorShared::new(&cfg.slo);
        let ctx = Arc::new(ctx);
        let monitor = crate::monitor::spawn(
            cfg.slo.clone(),
            Arc::clone(&ctx),
            Arc::clone(&ctx.monitor),
            Duration::from_millis(cfg.failover_retry_ms),
            Arc::clone(&risk_stop),
        )?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        runtime.spawn(server::serve(listener, ctx, tls.clone(), stop_rx.clone()));
        // SIGHUP reloads the policy, like the admin op, and the TLS certificate.
        {
            let admin = Arc::clone(&risk_admin);
            let tls = tls.clone();
            let mut stop = stop_rx.clone();
            let _g = runtime.enter();
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                runtime.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.changed() => break,
                            got = hup.recv() => {
                                if got.is_none() { break; }
                                match admin.reload(0) {
                                    Ok(l) => tracing::info!(version = l.version, label = %l.label, "policy reloaded on SIGHUP"),
                                    Err(e) => tracing::error!(error = %e, "policy reload on SIGHUP refused; the previous policy stays"),
                                }
                                if let Some(t) = &tls {
                                    match t.reload() {
                                        Ok(()) => tracing::info!("TLS certificate reloaded on SIGHUP"),
                                        Err(e) => tracing::error!(error = %e, "TLS reload on SIGHUP refused; the previous certificate stays"),
                                    }
                                }
                            }
                        }
                    }
                });
            }
        }
        // Supervision: a failed pipeline is visible on /health and unblocks waiting stages.
        {
            let pipeline = Arc::clone(&pipeline);
            let health = Arc::clone(&health);
            let dead = Arc::clone(&dead);
            let mut stop = stop_rx;
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {}
                    }
                    let failure = pipeline
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .as_ref()
                        .and_then(Pipeline::failure);
                    if let Some(f) = failure {
                        dead.store(true, Ordering::Relaxed);
                        *health
                            .failure
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(f.to_string());
                        break;
                    }
                }
            });
        }

        Ok(Engine {
            pipeline,
            runtime: Some(runtime),
            stop: stop_tx,
            addr,
            latency,
            health,
            dead,
            risk: risk_admin,
            risk_stop,
            audit_stats,
            journal,
            tls,
            monitor: Some(monitor),
            layout: LayoutReport {
                usable_cores: budget.usable_cores(),
                fused,
                wait,
                threads,
                core_map,
            },
            counters,
        })
    }

    /// Where desks connect (`ws://ADDR/v1/ws`, or `wss://` with `[tls]`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads the `[tls]` files again (as SIGHUP does): connections accepted from now on
    /// get the new certificate, live sessions keep theirs. Without `[tls]`, nothing to do.
    pub fn reload_tls(&self) -> Result<(), EngineError> {
        match &self.tls {
            Some(t) => Ok(t.reload()?),
            None => Ok(()),
        }
    }

    /// The latency histograms.
    pub fn latency(&self) -> &LatencyRegistry {
        &self.latency
    }

    /// How stages were laid out.
    pub fn layout(&self) -> &LayoutReport {
        &self.layout
    }

    /// Event counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The risk engine's admin side (policy reloads, kill switch, approvals).
    pub fn risk(&self) -> &Arc<RiskAdmin> {
        &self.risk
    }

    /// Audit writer counters.
    pub fn audit_stats(&self) -> &Arc<AuditStats> {
        &self.audit_stats
    }

    /// Why the pipeline failed, if it did.
    pub fn failure(&self) -> Option<String> {
        let from_pipeline = self
            .pipeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(Pipeline::failure)
            .map(|e| e.to_string());
        from_pipeline.or_else(|| {
            self.health
                .failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Stops accepting desks, closes their connections, drains and joins the stages.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.health.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let p = self
            .pipeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let res = match p {
            Some(p) => p.shutdown().map_err(EngineError::from),
            None => Ok(()),
        };
        self.dead.store(true, Ordering::Relaxed);
        self.risk_stop.store(true, Ordering::Release);
        if let Some(m) = self.monitor.take() {
            m.thread().unpark();
            let _ = m.join();
        }
        // The process's threads get the hot core back: an engine embedded in a longer
        // process (a load run starting one engine per rate) leaves its mask as it found it.
        if let Some(map) = &self.layout.core_map {
            let mut all = map.rest.clone();
            all.push(map.hot);
            all.sort_unstable();
            if let Err(e) = pipeline::confine_threads(None, &all) {
                tracing::warn!(error = %e, "could not give the hot core back to the process's threads");
            }
        }
        // Everything the stages wrote is synced before the engine says it stopped.
        if let Some(j) = self.journal.take() {
            j.shutdown();
        }
        res
    }

    /// The journal, when one is configured (its counters for `/metrics`).
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }
}

/// A blob slot holding `data` (none for empty calldata).
fn claim_blob(blobs: &BlobPool, data: &[u8]) -> Result<crate::blob::BlobRef, EngineError> {
    if data.is_empty() {
        return Ok(crate::blob::BlobRef::default());
    }
    blobs.claim_with(data).ok_or_else(|| {
        EngineError::Recovery("not enough blob slots for the recovered intents".into())
    })
}

/// Puts recovered work back into the running pipeline, on a `recovery-feed` thread so
/// start-up does not wait for it: events the chain settled while the engine was down and
/// refusals found at start, then intents to process again. However many there are, they
/// go in as blob slots and ring room free up; nothing is dropped. (Transactions to send
/// again went to the node during start-up, before the pipeline: `Plan::send_again`.)
fn spawn_resume(
    plan: Plan,
    status: StatusSink,
    intake: ManyToOneProducer<IntentMsg>,
    blobs: Arc<BlobPool>,
    stop: Arc<AtomicBool>,
) -> Result<(), EngineError> {
    std::thread::Builder::new()
        .name("recovery-feed".into())
        .spawn(move || resume(&plan, &status, &intake, &blobs, &stop))?;
    Ok(())
}

/// A blob slot holding `data`, waiting for one to free up; `None` if the engine stops
/// meanwhile.
fn claim_waiting(blobs: &BlobPool, data: &[u8], stop: &AtomicBool) -> Option<crate::blob::BlobRef> {
    if data.is_empty() {
        return Some(crate::blob::BlobRef::default());
    }
    loop {
        if let Some(r) = blobs.claim_with(data) {
            return Some(r);
        }
        if stop.load(Ordering::Acquire) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn resume(
    plan: &Plan,
    status: &StatusSink,
    intake: &ManyToOneProducer<IntentMsg>,
    blobs: &BlobPool,
    stop: &AtomicBool,
) {
    use crate::msg::{Reason, State};
    let now = pipeline::now_raw();
    for (seq, origin, why) in &plan.fail {
        status.send(StatusMsg::refusal(
            *seq,
            *origin,
            State::Failed,
            Reason::NodeRejected,
            why,
            now,
        ));
    }
    for (msg, data) in &plan.reinject {
        let mut m = *msg;
        let Some(data) = claim_waiting(blobs, data, stop) else {
            return;
        };
        m.data = data;
        m.hops = pipeline::Hops::starting_at(now);
        loop {
            match intake.try_push(m) {
                Ok(()) => break,
                Err(pipeline::Full(back)) => {
                    m = back;
                    if stop.load(Ordering::Acquire) {
                        blobs.release(m.data);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    if !plan.reinject.is_empty() {
        tracing::info!(
            reprocessed = plan.reinject.len(),
            "recovered intents handed back to the pipeline"
        );
    }
}

/// The `journal-compact` thread: every `every`, the segments no writer appends to any
/// more are read back, their finished intents reduced to `Done` records, and the result
/// written as the new `base` before they are deleted (`Journal::compact_closed`). Off the
/// stages' threads; the writers go on meanwhile.
fn spawn_compactor(
    journal: Journal,
    principals: Arc<Principals>,
    addresses: Vec<alloy_primitives::Address>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Result<(), EngineError> {
    std::thread::Builder::new()
        .name("journal-compact".into())
        .spawn(move || {
            let tick = Duration::from_millis(50).min(every);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(tick);
                waited += tick;
                if waited < every {
                    continue;
                }
                waited = Duration::ZERO;
                if let Err(e) = compact_once(&journal, &principals, &addresses) {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    tracing::error!(error = %e, "journal compaction failed; the segments stay as they are");
                }
            }
        })?;
    Ok(())
}

/// One online compaction; `Ok(false)` when no lane had a full segment.
fn compact_once(
    journal: &Journal,
    principals: &Principals,
    addresses: &[alloy_primitives::Address],
) -> Result<bool, crate::journal::JournalError> {
    let closed = journal.closed_segments()?;
    if closed.iter().all(|c| c.lane == crate::journal::BASE_LANE) {
        return Ok(false);
    }
    let replay = journal.read_closed(&closed)?;
    let recovered = Recovered::from_replay(&replay, addresses);
    drop(replay);
    journal.compact_closed(
        &closed,
        recovered.keep_records(|name| principals.intern(name)),
    )?;
    tracing::info!(
        segments = closed.len(),
        intents = recovered.entries.len(),
        "journal compacted"
    );
    Ok(true)
}
