//! Broadcast stage overhead: from a signed transaction taken off the stage's input ring to
//! its request bytes written to a provider's socket (`broadcast.service`, the runner's own
//! meter), and the socket write call alone inside it (`broadcast.socket_write`), with two
//! providers and hedging on, against a real anvil the run starts itself.
//!
//! The stage runs on its own pipeline thread exactly as in the engine; this thread is the
//! signing side: it feeds pre-signed transactions at a fixed rate into the one-to-one ring
//! and drains the stage's output (accepted hashes) and status events. Two layouts:
//!
//! - `hot-core`: the stage pinned to the highest core, busy-spinning; this thread and anvil
//!   confined to the other cores (the engine's `hot_core` map);
//! - `shared`: no pinning, spin-yield-park (the engine's default on two cores).
//!
//! Each layout runs three times; the report (`latency-reports/<time>-broadcast/`) has the
//! per-run table, each run's `.hgrm` distributions and the machine description.
//!
//! `cargo bench -p benches --bench broadcast` (after `scripts/setup.sh`, which installs
//! anvil). `BROADCAST_RATE` (tx/s, default 1000) and `BROADCAST_TXS` (per run, default
//! 4000) change the load.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{TxKind, U256};
use benches::{hgrm, machine_description, reports_root, tight_timer_slack};
use engine::blob::BlobPool;
use engine::msg::{AccountIdx, Origin, State, StatusKind, StatusMsg, TxMsg};
use engine::risk::kill::KillSwitch;
use engine::stages::StatusSink;
use engine::stages::broadcast::{
    BroadcastRecorders, BroadcastStage, BroadcastStats, BroadcastTuning, ProviderSpec,
};
use hdrhistogram::Histogram;
use pipeline::report::{SUMMARY_HEADER, run_dir, summary_row};
use pipeline::{
    CoreBudget, CoreMap, Hops, Input, Output, PipelineBuilder, ThreadConfig, WaitKind,
    confine_threads, many_to_one, now_raw, one_to_one,
};
use signers::{LocalCurve, LocalSigner, Signer};
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS, RpcClient};

/// Accounts the transactions come from (anvil's first five keys).
const ACCOUNTS: usize = 5;
/// Target of `broadcast.service` p99 (ns).
const TARGET_P99_NS: u64 = 20_000;

struct Run {
    layout: &'static str,
    service: Histogram<u64>,
    socket_write: Histogram<u64>,
    queue_wait: Histogram<u64>,
    broadcast_events: usize,
    failed: usize,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if benches::filtered_out("broadcast") {
        return;
    }
    let rate = env_or("BROADCAST_RATE", 1000).max(1);
    let txs = env_or("BROADCAST_TXS", 4000).max(1) as usize;
    tight_timer_slack();

    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_secs(1)))
        .expect("anvil starts (run scripts/setup.sh first)");
    let mut rpc = RpcClient::connect(&anvil.ws_url()).expect("connect to anvil");
    let chain_id = rpc.chain_id().expect("chain id");
    let signers: Vec<LocalSigner> = DEV_PRIVATE_KEYS[..ACCOUNTS]
        .iter()
        .map(|k| LocalSigner::from_hex("k", k, LocalCurve::Secp256k1).expect("dev key"))
        .collect();
    let mut nonces = [0u64; ACCOUNTS];
    let budget = CoreBudget::detect();
    let map = CoreMap::isolate(&budget, None).ok();

    let mut runs = Vec::new();
    for layout in ["hot-core", "shared"] {
        if layout == "hot-core" && map.is_none() {
            eprintln!("broadcast bench: fewer than two usable cores, no hot-core layout");
            continue;
        }
        for _ in 0..3 {
            let fee = rpc.fee_estimate().expect("fee estimate");
            let max_fee = fee.base_fee_per_gas * 10 + fee.max_priority_fee_per_gas;
            let raws: Vec<(usize, u64, alloy_primitives::B256, Vec<u8>)> = (0..txs)
                .map(|i| {
                    let a = i % ACCOUNTS;
                    let nonce = nonces[a];
                    nonces[a] += 1;
                    let t = TxEip1559 {
                        chain_id,
                        nonce,
                        gas_limit: 21_000,
                        max_fee_per_gas: max_fee,
                        max_priority_fee_per_gas: fee.max_priority_fee_per_gas,
                        to: TxKind::Call(DEV_ADDRESSES[5 + a]),
                        value: U256::from(1),
                        ..TxEip1559::default()
                    };
                    let sig = signers[a].sign_hash(&t.signature_hash()).expect("sign");
                    let env: TxEnvelope = t.into_signed(sig).into();
                    (a, nonce, *env.tx_hash(), env.encoded_2718())
                })
                .collect();
            let run = run_once(layout, &budget, map.as_ref(), &anvil, &raws, rate);
            eprintln!(
                "broadcast bench: {layout}: service p50 {:.1} µs p99 {:.1} µs, socket write p50 {:.1} µs p99 {:.1} µs, {} broadcast, {} failed",
                run.service.value_at_quantile(0.5) as f64 / 1e3,
                run.service.value_at_quantile(0.99) as f64 / 1e3,
                run.socket_write.value_at_quantile(0.5) as f64 / 1e3,
                run.socket_write.value_at_quantile(0.99) as f64 / 1e3,
                run.broadcast_events,
                run.failed,
            );
            runs.push(run);
            // Let anvil mine what this run sent before the next one.
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    let floor = write_floor(map.as_ref(), &budget, rate, txs);
    write_report(&runs, &floor, rate, txs, map.as_ref());
}

fn run_once(
    layout: &'static str,
    budget: &CoreBudget,
    map: Option<&CoreMap>,
    anvil: &Anvil,
    raws: &[(usize, u64, alloy_primitives::B256, Vec<u8>)],
    rate: u64,
) -> Run {
    let cap = 8192;
    let blobs = Arc::new(BlobPool::new(cap));
    let (status_tx, mut status_rx) = many_to_one::<StatusMsg>(cap);
    let status = StatusSink::new(status_tx, Arc::new(AtomicBool::new(false)));
    let kill = Arc::new(KillSwitch::new(4));
    let names = ["anvil-0".to_owned(), "anvil-1".to_owned()];
    let specs: Vec<ProviderSpec> = names
        .iter()
        .map(|n| ProviderSpec {
            name: n.clone(),
            ws_url: anvil.ws_url(),
            venue: kill.venue_slot(n).expect("venue slot"),
        })
        .collect();
    let mut builder = PipelineBuilder::with_core_budget(budget.clone());
    let latency = builder.latency().clone();
    let stage = BroadcastStage::connect(
        &specs,
        BroadcastTuning::default(),
        Arc::clone(&blobs),
        status,
        BroadcastRecorders::standard(&latency),
        cap,
        kill,
        Arc::new(BroadcastStats::new(&names)),
    )
    .expect("connect the providers");
    let (mut tx_in, rx_in) = one_to_one::<TxMsg>(cap);
    let (tx_out, mut rx_out) = one_to_one::<TxMsg>(cap);
    let thread = match (layout, map) {
        ("hot-core", Some(m)) => {
            // This thread (the feeder) and anvil stay off the hot core.
            let _ = confine_threads(None, &m.rest);
            let _ = confine_threads(Some(anvil.pid()), &m.rest);
            ThreadConfig::new("broadcast", WaitKind::BusySpin).pinned(m.hot)
        }
        _ => {
            let all = budget.core_ids().to_vec();
            let _ = confine_threads(None, &all);
            let _ = confine_threads(Some(anvil.pid()), &all);
            ThreadConfig::new("broadcast", WaitKind::SpinYieldPark)
        }
    };
    builder
        .spawn(
            thread,
            Input::OneToOne(rx_in),
            stage,
            Output::OneToOne(tx_out),
        )
        .expect("spawn the stage");
    let pipeline = builder.start();

    let broadcast_events = Cell::new(0usize);
    let failed = Cell::new(0usize);
    let drain = |status_rx: &mut pipeline::ManyToOneConsumer<StatusMsg>,
                 rx_out: &mut pipeline::OneToOneConsumer<TxMsg>| {
        while let Some(m) = rx_out.pop() {
            blobs.release(m.raw);
        }
        while let Some(m) = status_rx.pop() {
            if m.kind == StatusKind::Event {
                match m.state {
                    State::Broadcast => broadcast_events.set(broadcast_events.get() + 1),
                    State::Failed => failed.set(failed.get() + 1),
                    _ => {}
                }
            }
        }
    };
    let gap = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    for (i, (a, nonce, hash, raw)) in raws.iter().enumerate() {
        let due = start + gap * i as u32;
        while Instant::now() < due {
            drain(&mut status_rx, &mut rx_out);
            std::hint::spin_loop();
        }
        let msg = TxMsg {
            seq: i as u64 + 1,
            origin: Origin {
                conn: 1,
                principal: 1,
            },
            account: AccountIdx(*a as u16),
            nonce: *nonce,
            tx_hash: *hash,
            raw: blobs.claim_with(raw).expect("blob slot"),
            hops: Hops::starting_at(now_raw()),
            ..TxMsg::default()
        };
        let mut m = msg;
        while let Err(full) = tx_in.try_push(m) {
            m = full.0;
            drain(&mut status_rx, &mut rx_out);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while broadcast_events.get() + failed.get() < raws.len() && Instant::now() < deadline {
        drain(&mut status_rx, &mut rx_out);
        std::thread::sleep(Duration::from_millis(1));
    }
    pipeline.shutdown().expect("stage shuts down cleanly");
    drain(&mut status_rx, &mut rx_out);
    let snap = |name: &str| {
        latency
            .snapshot()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.cumulative)
            .unwrap_or_else(pipeline::latency::new_histogram)
    };
    Run {
        layout,
        service: snap("broadcast.service"),
        socket_write: snap("broadcast.socket_write"),
        queue_wait: snap("broadcast.queue_wait"),
        broadcast_events: broadcast_events.get(),
        failed: failed.get(),
    }
}

/// The kernel's floor on this machine: a plain `write` of a request-sized buffer on a
/// loopback TCP socket (no WebSocket, no stage) whose reader thread sleeps in `read`, as
/// anvil's does, paced like the runs; the writer on the hot core, the reader on the rest.
fn write_floor(map: Option<&CoreMap>, budget: &CoreBudget, rate: u64, n: usize) -> Histogram<u64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let rest = map.map_or_else(|| budget.core_ids().to_vec(), |m| m.rest.clone());
    let reader = std::thread::spawn(move || {
        if let Some(&c) = rest.first() {
            benches::pin(c);
        }
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 65536];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let hot = map.map(|m| m.hot);
    let mut out = std::net::TcpStream::connect(addr).expect("connect");
    out.set_nodelay(true).expect("nodelay");
    let writer = std::thread::spawn(move || {
        if let Some(c) = hot {
            benches::pin(c);
        }
        // An eth_sendRawTransaction frame for a transfer is about 350 bytes.
        let frame = [b'a'; 350];
        let mut h = pipeline::latency::new_histogram();
        let gap = Duration::from_nanos(1_000_000_000 / rate);
        let start = Instant::now();
        for i in 0..n {
            let due = start + gap * i as u32;
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let t = now_raw();
            out.write_all(&frame).expect("write");
            let _ = h.record(pipeline::ticks_to_ns(t, now_raw()).max(1));
        }
        h
    });
    let h = writer.join().expect("writer");
    let _ = reader.join();
    h
}

fn write_report(
    runs: &[Run],
    floor: &Histogram<u64>,
    rate: u64,
    txs: usize,
    map: Option<&CoreMap>,
) {
    let dir = run_dir(&reports_root(), "broadcast").expect("report dir");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Broadcast stage overhead\n\n`cargo bench -p benches --bench broadcast`: {txs} signed \
         transactions per run at {rate} tx/s into the broadcast stage (two providers on one \
         anvil, hedging on, default tuning), three runs per layout.\n\n\
         - `broadcast.service`: input ring pop → return after the first provider's socket \
         write (the runner's meter).\n\
         - `broadcast.socket_write`: the socket write call alone, inside it (the kernel).\n\
         - `broadcast.queue_wait`: feeder's push → the stage's pop.\n\n\
         Core map (hot-core layout): {}\n\n{}\n",
        map.map_or("none".to_owned(), |m| format!(
            "stage on core {}, feeder and anvil on {:?}",
            m.hot, m.rest
        )),
        machine_description()
    );
    let _ = writeln!(md, "{SUMMARY_HEADER}");
    for (k, r) in runs.iter().enumerate() {
        let n = k % 3 + 1;
        for (what, h) in [
            ("broadcast.service", &r.service),
            ("broadcast.socket_write", &r.socket_write),
            ("broadcast.queue_wait", &r.queue_wait),
        ] {
            let _ = writeln!(
                md,
                "{}",
                summary_row(&format!("{} run {n}: {what}", r.layout), h)
            );
            let _ = std::fs::write(
                dir.join(format!("{}-run{n}-{what}.hgrm", r.layout)),
                hgrm(h),
            );
        }
    }
    let _ = writeln!(
        md,
        "{}",
        summary_row("floor: plain loopback TCP write, sleeping reader", floor)
    );
    let _ = std::fs::write(dir.join("floor-loopback-write.hgrm"), hgrm(floor));
    let _ = writeln!(
        md,
        "\nThe floor row is this machine's kernel alone: a 350-byte `write` on a loopback TCP \
         socket whose reader sleeps in `read` (as anvil's does), from the hot core, paced \
         like the runs. On loopback the write also wakes the reader on the other core, so its \
         cost is charged to the writer; `broadcast.service` less `broadcast.socket_write` is \
         the stage's own work.\n\nTarget: `broadcast.service` p99 under 20 µs (floor p99 \
         here: {:.1} µs).",
        floor.value_at_quantile(0.99) as f64 / 1e3
    );
    for r in runs {
        let p99 = r.service.value_at_quantile(0.99);
        let _ = writeln!(
            md,
            "- {}: p99 {:.1} µs ({}); socket write alone p50 {:.1} µs, p99 {:.1} µs; {} broadcast, {} failed",
            r.layout,
            p99 as f64 / 1e3,
            if p99 < TARGET_P99_NS { "met" } else { "missed" },
            r.socket_write.value_at_quantile(0.5) as f64 / 1e3,
            r.socket_write.value_at_quantile(0.99) as f64 / 1e3,
            r.broadcast_events,
            r.failed,
        );
    }
    std::fs::write(dir.join("README.md"), &md).expect("write report");
    println!("{md}\nreport written to {}", dir.display());
}
