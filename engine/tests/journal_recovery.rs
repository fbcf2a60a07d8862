//! The journal through the engine (in process, real anvil): what an `ack` promises across
//! a restart, group commit, and what start-up does with a torn or a corrupt segment.
//! The kill -9 suite with a real process is `crash.rs`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{SECRET, collect_until_final, submit, transfer};
use engine::auth::{JwtAuth, Roles};
use engine::config::{JournalSettings, JournalSync};
use engine::desk::Desk;
use engine::{Config, Engine, EngineError, dev};
use serde_json::Value;
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES};

fn config(anvil: &Anvil, journal: &Path, sync: JournalSync) -> Config {
    let mut cfg = dev::dev_config(
        &anvil.ws_url(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SECRET.into(),
    );
    cfg.confirmations = 1;
    cfg.journal = Some(JournalSettings {
        dir: journal.to_path_buf(),
        segment_bytes: 1 << 20,
        sync,
        group_commit_us: 200,
        interval_ms: 10,
        compact_every_ms: 0,
    });
    cfg
}

fn desk(rt: &tokio::runtime::Runtime, e: &Engine) -> Desk {
    let url = format!("ws://{}/v1/ws", e.local_addr());
    let token = JwtAuth::new(SECRET.as_bytes()).issue("desk-a", Roles::all(), 3600);
    rt.block_on(Desk::connect(&url, Some(&token))).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `n` transfers of dev0 to the end; their (id, seq) pairs.
fn run_transfers(
    rt: &tokio::runtime::Runtime,
    e: &Engine,
    prefix: &str,
    n: usize,
) -> Vec<(String, u64)> {
    let mut d = desk(rt, e);
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let frames = rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            d.send(&submit(transfer(id, "dev0", 5, 1_000 + i as u128)))
                .await
                .unwrap();
        }
        collect_until_final(&mut d, &ids, Duration::from_secs(60)).await
    });
    ids.iter()
        .map(|id| {
            let f = &frames[id];
            // The ack comes first (under group commit it waits for the sync, and so
            // does everything behind it).
            assert_eq!(f[0]["op"], "ack", "{id}: {f:?}");
            let ack = &f[0];
            let last = f.last().unwrap();
            assert_eq!(last["state"], "confirmed", "{id}: {f:?}");
            (id.clone(), ack["seq"].as_u64().unwrap())
        })
        .collect()
}

fn segments(dir: &Path, lane: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{lane}-")) && n.ends_with(".seg"))
        })
        .collect();
    v.sort();
    v
}

/// Byte offsets of the frames written in a segment (format: u32 len, u32 crc, payload,
/// padding to 8; a zero len ends the written part).
fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        out.push((pos, len));
        pos += 8 + len.div_ceil(8) * 8;
    }
    out
}

#[test]
fn an_acked_intent_survives_a_restart_and_its_id_stays_taken() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::start(config(&anvil, dir.path(), JournalSync::None)).unwrap();
    let first = run_transfers(&rt, &e, "r", 5);
    e.shutdown().unwrap();

    let e = Engine::start(config(&anvil, dir.path(), JournalSync::None)).unwrap();
    let mut d = desk(&rt, &e);
    rt.block_on(async {
        for (id, seq) in &first {
            d.send(&submit(transfer(id, "dev0", 5, 1_000)))
                .await
                .unwrap();
            let ack = common::reply(&mut d, id).await;
            assert_eq!(ack["op"], "ack", "{ack}");
            assert_eq!(ack["duplicate"], true, "{id} after a restart: {ack}");
            assert_eq!(ack["seq"].as_u64(), Some(*seq), "{id}: same intent");
            // The latest state comes with it, from the journal.
            let latest: Value = tokio::time::timeout(Duration::from_secs(5), d.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(latest["state"], "confirmed", "{latest}");
        }
    });
    // New intents are numbered after the recovered ones.
    let more = run_transfers(&rt, &e, "s", 2);
    let top = first.iter().map(|(_, s)| *s).max().unwrap();
    assert!(more.iter().all(|(_, s)| *s > top), "{more:?} after {top}");
    e.shutdown().unwrap();
    // Seven transfers on chain, not twelve.
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        7
    );
}

#[test]
fn group_commit_acks_only_synced_intents_and_they_all_land() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::start(config(&anvil, dir.path(), JournalSync::Group)).unwrap();
    run_transfers(&rt, &e, "g", 20);
    let stats = e.journal().expect("journal configured").stats();
    assert!(stats.syncs > 0, "group commit synced nothing: {stats:?}");
    // And SREs see it.
    let body = common::http_get(e.local_addr(), "/metrics");
    let syncs: f64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("engine_journal_syncs_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no journal syncs metric in:\n{body}"));
    assert!(syncs > 0.0, "{body}");
    // Twenty intents and the principal's name; five events each.
    assert!(
        body.contains("engine_journal_records_total{lane=\"intake\"} 21"),
        "{body}"
    );
    assert!(
        body.contains("engine_journal_records_total{lane=\"events\"} 100"),
        "{body}"
    );
    e.shutdown().unwrap();
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        20
    );
}

#[test]
fn a_torn_last_record_is_cut_off_and_start_up_goes_on() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::start(config(&anvil, dir.path(), JournalSync::None)).unwrap();
    let first = run_transfers(&rt, &e, "t", 3);
    e.shutdown().unwrap();
    // A partial write at the end of the intake lane: a frame header and part of a body.
    let seg = segments(dir.path(), "intake")
        .pop()
        .expect("an intake segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let end = frames(&bytes)
        .last()
        .map_or(0, |(p, l)| p + 8 + l.div_ceil(8) * 8);
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    for b in &mut bytes[end + 8..end + 40] {
        *b = 0x5a;
    }
    std::fs::write(&seg, &bytes).unwrap();

    let e = Engine::start(config(&anvil, dir.path(), JournalSync::None))
        .expect("a torn last record does not stop start-up");
    let mut d = desk(&rt, &e);
    rt.block_on(async {
        let (id, seq) = &first[2];
        d.send(&submit(transfer(id, "dev0", 5, 1_000)))
            .await
            .unwrap();
        let ack = common::reply(&mut d, id).await;
        assert_eq!(ack["duplicate"], true, "{ack}");
        assert_eq!(ack["seq"].as_u64(), Some(*seq));
    });
    e.shutdown().unwrap();
}

#[test]
fn a_corrupt_record_in_the_middle_stops_start_up_and_names_its_offset() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::start(config(&anvil, dir.path(), JournalSync::None)).unwrap();
    run_transfers(&rt, &e, "m", 3);
    e.shutdown().unwrap();
    let seg = segments(dir.path(), "signing")
        .pop()
        .expect("a signing segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let f = frames(&bytes);
    assert!(f.len() >= 3, "{f:?}");
    let (offset, _) = f[1];
    bytes[offset + 8 + 20] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Engine::start(config(&anvil, dir.path(), JournalSync::None))
        .expect_err("a corrupt record in the middle must stop start-up");
    assert!(matches!(err, EngineError::Journal(_)), "{err}");
    let text = err.to_string();
    let name = seg.file_name().unwrap().to_str().unwrap();
    assert!(text.contains(name), "names the segment: {text}");
    assert!(
        text.contains(&offset.to_string()),
        "names offset {offset}: {text}"
    );
}

#[test]
fn finished_intents_are_compacted_while_running_and_their_ids_survive() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut cfg = config(&anvil, dir.path(), JournalSync::None);
    if let Some(j) = cfg.journal.as_mut() {
        // Small segments, so the lanes rotate; a compaction pass every 100 ms.
        j.segment_bytes = 16 << 10;
        j.compact_every_ms = 100;
    }
    let e = Engine::start(cfg.clone()).unwrap();
    let first = run_transfers(&rt, &e, "k", 60);
    let journal = e.journal().unwrap().clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while journal.stats().compactions == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction ran: {:?}",
            journal.stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The events lane alone filled more than five 16 KiB segments (60 intents, five
    // events each); compaction leaves the lanes' open segments and the base. A pass that
    // ran while the last events were still being written leaves their segments to the
    // next pass (every 100 ms).
    loop {
        let closed_left = journal
            .closed_segments()
            .unwrap()
            .into_iter()
            .filter(|c| c.lane != "base")
            .count();
        let events = segments(dir.path(), "events").len();
        if events <= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{events} events segments left ({closed_left} closed) after {} compactions",
            journal.stats().compactions
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(journal);
    e.shutdown().unwrap();

    // After a restart the compacted intents are still known, finished, by their ids.
    let e = Engine::start(cfg).unwrap();
    let mut d = desk(&rt, &e);
    rt.block_on(async {
        for (id, seq) in first.iter().take(10) {
            d.send(&submit(transfer(id, "dev0", 5, 1_000)))
                .await
                .unwrap();
            let ack = common::reply(&mut d, id).await;
            assert_eq!(ack["duplicate"], true, "{id}: {ack}");
            assert_eq!(ack["seq"].as_u64(), Some(*seq), "{id}");
            let latest: Value = tokio::time::timeout(Duration::from_secs(5), d.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(latest["state"], "confirmed", "{latest}");
        }
    });
    e.shutdown().unwrap();
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        60
    );
}
