//! The journal's storage layer on its own: round trips of every record kind over several
//! lanes and segment rotations, torn last records, corruption in the middle, group
//! commit, compaction, a writer killed with SIGKILL, and appends that allocate nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use engine::journal::{
    DoneRec, IntentRec, Journal, JournalConfig, JournalError, OwnedRecord, Pos, PrincipalRec,
    Replay, SignedRec, StateRec, SyncPolicy,
};

// ---------------------------------------------------------------------------------------
// Allocation counting, per thread: tests run in parallel, only the measured thread counts.

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------
// Helpers.

fn cfg(dir: &Path, segment_bytes: u64, sync: SyncPolicy) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
        sync,
        sealer: None,
    }
}

fn intent(seq: u64) -> IntentRec {
    IntentRec {
        seq,
        principal: 1 + (seq % 3) as u32,
        id: IntentRec::id_bytes(&format!("order-{seq}")),
        account: [seq as u8; 20],
        account_idx: (seq % 5) as u16,
        kind: 1,
        route: 2,
        urgent: seq.is_multiple_of(2),
        public_fallback: seq.is_multiple_of(3),
        to: [0xab; 20],
        value: [seq as u8; 32],
        gas_limit: 21_000 + seq,
        max_fee_cap: (seq as u128 * 1_000_000_007).to_le_bytes(),
        travel_present: true,
        travel_vasp_key: seq * 7,
        travel_hash: [0x11; 32],
        approved_by: 2,
        at_unix_ns: 1_700_000_000_000_000_000 + seq,
        calldata_len: 0,
    }
}

fn calldata(seq: u64) -> Vec<u8> {
    (0..(seq % 250) as usize)
        .map(|i| (i as u64 ^ seq) as u8)
        .collect()
}

fn signed(seq: u64) -> SignedRec {
    SignedRec {
        seq,
        account: [7; 20],
        account_idx: 3,
        nonce: seq + 100,
        generation: (seq % 4) as u16,
        purpose: 1,
        max_fee: (u128::MAX - seq as u128).to_le_bytes(),
        priority_fee: 2_000_000_000u128.to_le_bytes(),
        tx_hash: [seq as u8; 32],
        route: 1,
        urgent: true,
        public_fallback: false,
        max_block: seq * 2,
        at_unix_ns: seq,
        raw_len: 0,
    }
}

fn raw(seq: u64) -> Vec<u8> {
    vec![0x02; 100 + (seq % 150) as usize]
}

fn state(seq: u64) -> StateRec {
    StateRec {
        seq,
        state: (seq % 9) as u8,
        reason: 3,
        tx_hash: [1; 32],
        from: [2; 20],
        nonce: seq,
        block_number: 1000 + seq,
        block_hash: [3; 32],
        gas_used: 21_000,
        success: true,
        depth: 12,
        route: 1,
        venues: 2,
        policy_version: 9,
        detail: StateRec::detail_bytes(&format!("state change number {seq} ✓")),
        at_unix_us: seq * 1000,
    }
}

/// The records lane `lane` gets for `seq`, as replay returns them.
fn records_for(lane: &str, seq: u64) -> Vec<OwnedRecord> {
    match lane {
        "intake" => {
            let mut out = Vec::new();
            if seq.is_multiple_of(10) {
                out.push(OwnedRecord::Principal(PrincipalRec::new(
                    seq as u32,
                    &format!("desk-{seq}"),
                )));
            }
            let data = calldata(seq);
            let mut r = intent(seq);
            r.calldata_len = data.len() as u32;
            out.push(OwnedRecord::Intent(r, data));
            out
        }
        "signing" => {
            let data = raw(seq);
            let mut r = signed(seq);
            r.raw_len = data.len() as u32;
            vec![OwnedRecord::Signed(r, data)]
        }
        _ => {
            let mut out = vec![OwnedRecord::State(state(seq))];
            if seq.is_multiple_of(7) {
                out.push(OwnedRecord::Done(DoneRec::new(
                    seq,
                    "desk-a",
                    &format!("order-{seq}"),
                    6,
                    0,
                    [9; 32],
                    seq,
                )));
            }
            out
        }
    }
}

const LANES: [&str; 3] = ["intake", "signing", "events"];

/// Appends the records of `seqs` to the three lanes; their positions per lane.
fn append_range(j: &Journal, seqs: std::ops::Range<u64>) -> Vec<Vec<Pos>> {
    let mut writers: Vec<_> = LANES.iter().map(|l| j.lane(l).unwrap()).collect();
    let mut out = vec![Vec::new(); 3];
    for seq in seqs {
        for (i, l) in LANES.iter().enumerate() {
            for r in records_for(l, seq) {
                out[i].push(writers[i].append_record(&r).unwrap());
            }
        }
    }
    out
}

fn lane_records(replay: &Replay, lane: &str) -> Vec<OwnedRecord> {
    replay.lane(lane).iter().map(|(_, r)| r.clone()).collect()
}

fn segments(dir: &Path, lane: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(&format!("{lane}-")) && n.ends_with(".seg")
        })
        .collect();
    v.sort();
    v
}

/// Frame offsets and payload lengths in a segment's bytes.
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

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------
// Round trips.

#[test]
fn every_record_kind_round_trips_across_lanes_rotations_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 8192, SyncPolicy::None);
    let (j, replay) = Journal::open(c.clone()).unwrap();
    assert!(replay.is_empty() && replay.truncated.is_empty());
    let first = append_range(&j, 0..300);
    for p in &first {
        assert!(p.windows(2).all(|w| w[0] < w[1]), "positions grow");
    }
    let stats = j.stats();
    assert_eq!(stats.lanes.len(), 3);
    assert!(stats.lanes.iter().all(|l| l.segments > 3), "{stats:?}");
    j.shutdown();
    drop(j);
    for l in LANES {
        assert!(segments(dir.path(), l).len() > 3, "{l} rotated");
    }

    let (j, replay) = Journal::open(c.clone()).unwrap();
    assert!(replay.truncated.is_empty());
    for (i, l) in LANES.iter().enumerate() {
        let want: Vec<OwnedRecord> = (0..300).flat_map(|s| records_for(l, s)).collect();
        assert_eq!(lane_records(&replay, l), want, "{l}");
        let pos: Vec<Pos> = replay.lane(l).iter().map(|(p, _)| *p).collect();
        assert_eq!(pos, first[i], "{l}: the positions append returned");
    }
    // Appending resumes after the last frame of each lane.
    let second = append_range(&j, 300..400);
    for i in 0..3 {
        assert!(second[i][0] > *first[i].last().unwrap());
    }
    drop(j);

    let (_j, replay) = Journal::open(c).unwrap();
    for l in LANES {
        let want: Vec<OwnedRecord> = (0..400).flat_map(|s| records_for(l, s)).collect();
        assert_eq!(lane_records(&replay, l), want, "{l} after a second run");
    }
}

#[test]
fn lanes_are_named_taken_once_and_the_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(cfg(dir.path(), 8192, SyncPolicy::None)).unwrap();
    assert!(matches!(j.lane("Intake"), Err(JournalError::BadLane(_))));
    assert!(matches!(j.lane("in-take"), Err(JournalError::BadLane(_))));
    assert!(matches!(j.lane(""), Err(JournalError::BadLane(_))));
    assert!(matches!(j.lane("base"), Err(JournalError::BadLane(_))));
    let mut w = j.lane("intake").unwrap();
    assert!(matches!(
        j.lane("intake"),
        Err(JournalError::LaneTaken("intake"))
    ));
    assert!(matches!(
        Journal::open(cfg(dir.path(), 8192, SyncPolicy::None)),
        Err(JournalError::Locked { .. })
    ));
    // A record that cannot fit a segment is refused, not split.
    let big = vec![0u8; 9000];
    assert!(matches!(
        w.append_intent(&intent(1), &big),
        Err(JournalError::TooLarge { .. })
    ));
    // A tail on a record kind without one is refused.
    assert!(w.append(&state(1), &[1]).is_err());
    w.append_state(&state(1)).unwrap();
    assert!(
        matches!(
            Journal::open(cfg(dir.path(), 1000, SyncPolicy::None)),
            Err(JournalError::Config(_))
        ),
        "segment size checked"
    );
    // The writer moves to its stage's thread; watches and the journal are shared.
    let watch = w.durable();
    let (w2, p) = std::thread::spawn(move || {
        let p = w.append_state(&state(3)).unwrap();
        (w, p)
    })
    .join()
    .unwrap();
    let mut w = w2;
    let j2 = j.clone();
    assert!(
        std::thread::spawn(move || watch.is_durable(p) && j2.stats().lanes.len() == 1)
            .join()
            .unwrap()
    );
    j.shutdown();
    assert!(matches!(
        w.append_state(&state(2)),
        Err(JournalError::Closed)
    ));
    // Shut down: the directory can be opened again, with what was appended.
    let (_j2, replay) = Journal::open(cfg(dir.path(), 8192, SyncPolicy::None)).unwrap();
    assert_eq!(
        lane_records(&replay, "intake"),
        vec![OwnedRecord::State(state(1)), OwnedRecord::State(state(3))]
    );
}

// ---------------------------------------------------------------------------------------
// Torn tails and corruption.

/// Writes 20 intents to `intake` and closes the journal; the lane's (only) segment.
fn one_lane(dir: &Path) -> PathBuf {
    let (j, _) = Journal::open(cfg(dir, 1 << 16, SyncPolicy::None)).unwrap();
    let mut w = j.lane("intake").unwrap();
    for s in 0..20 {
        w.append_intent(&intent(s), &calldata(s + 100)).unwrap();
    }
    drop(w);
    drop(j);
    let segs = segments(dir, "intake");
    assert_eq!(segs.len(), 1);
    segs[0].clone()
}

fn check_torn_then_append(dir: &Path, seg: &Path, at: usize, what: &str) {
    let (j, replay) = Journal::open(cfg(dir, 1 << 16, SyncPolicy::None)).unwrap();
    assert_eq!(replay.truncated.len(), 1, "{what}: {:?}", replay.truncated);
    let t = &replay.truncated[0];
    assert_eq!(t.lane, "intake");
    assert_eq!(t.file, seg);
    assert_eq!(t.offset, at as u64, "{what}");
    assert_eq!(
        replay.lane("intake").len(),
        19,
        "{what}: the torn record is gone"
    );
    // The bytes were zeroed in the file.
    let bytes = std::fs::read(seg).unwrap();
    assert!(bytes[at..].iter().all(|&b| b == 0), "{what}: zeroed");
    // Appending goes on where the torn record was.
    let mut w = j.lane("intake").unwrap();
    let p = w.append_intent(&intent(99), b"after").unwrap();
    assert!(
        p.offset() > at as u64 && p.offset() < at as u64 + 512,
        "{what}: {p:?}"
    );
    drop(w);
    drop(j);
    let (_j, replay) = Journal::open(cfg(dir, 1 << 16, SyncPolicy::None)).unwrap();
    assert!(replay.truncated.is_empty(), "{what}: repaired for good");
    let recs = lane_records(&replay, "intake");
    assert_eq!(recs.len(), 20);
    assert!(matches!(&recs[19], OwnedRecord::Intent(r, d) if r.seq == 99 && d == b"after"));
}

#[test]
fn a_torn_last_record_is_cut_off_reported_and_appending_goes_on() {
    // The last frame's payload partly zero (a write cut short).
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, len) = *frames(&bytes).last().unwrap();
    bytes[at + 8 + len / 2..at + 8 + len].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    check_torn_then_append(dir.path(), &seg, at, "zeroed tail");

    // The file cut in the middle of the last frame.
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    let (at, len) = *frames(&bytes).last().unwrap();
    std::fs::write(&seg, &bytes[..at + 8 + len / 3]).unwrap();
    check_torn_then_append(dir.path(), &seg, at, "cut file");

    // A header written after the last frame with only part of its payload.
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, len) = frames(&bytes)[18];
    let end = at + 8 + len.div_ceil(8) * 8;
    // Drop the 20th frame and write a partial one in its place.
    let (last, _) = frames(&bytes)[19];
    assert_eq!(last, end);
    bytes[end..].fill(0);
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    bytes[end + 8..end + 40].fill(0x5a);
    std::fs::write(&seg, &bytes).unwrap();
    let (_j, replay) = Journal::open(cfg(dir.path(), 1 << 16, SyncPolicy::None)).unwrap();
    assert_eq!(replay.truncated.len(), 1);
    assert_eq!(replay.truncated[0].offset, end as u64);
    assert_eq!(replay.lane("intake").len(), 19);
    drop(_j);

    // An append that was never published (payload bytes, header still zero).
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, _) = *frames(&bytes).last().unwrap();
    bytes[at..at + 8].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    check_torn_then_append(dir.path(), &seg, at, "unpublished append");
}

#[test]
fn a_flipped_byte_in_the_middle_is_corruption_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let f = frames(&bytes);
    let (at, _) = f[7];
    bytes[at + 8 + 20] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Journal::open(cfg(dir.path(), 1 << 16, SyncPolicy::None)).unwrap_err();
    match &err {
        JournalError::Corrupt { file, offset, what } => {
            assert_eq!(file, &seg);
            assert_eq!(*offset, at as u64);
            assert_eq!(what, "checksum mismatch");
        }
        other => panic!("not Corrupt: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&seg.display().to_string()), "{text}");
    assert!(text.contains(&format!("byte offset {at}")), "{text}");
    assert!(text.contains("refusing to start"), "{text}");
    // Nothing was changed by the failed open.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);

    // A damaged length that swallows the frames after it is corruption too.
    let dir = tempfile::tempdir().unwrap();
    let seg = one_lane(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let f = frames(&bytes);
    let (at, _) = f[10];
    let (last, len) = f[19];
    let claim = (last + 8 + len - at - 8) as u32 + 8;
    bytes[at..at + 4].copy_from_slice(&claim.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let err = Journal::open(cfg(dir.path(), 1 << 16, SyncPolicy::None)).unwrap_err();
    assert!(
        matches!(err, JournalError::Corrupt { offset, .. } if offset == at as u64),
        "{err}"
    );

    // A bad last frame in a segment that is not the lane's last is corruption.
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(cfg(dir.path(), 4096, SyncPolicy::None)).unwrap();
    let mut w = j.lane("signing").unwrap();
    for s in 0..40 {
        w.append_signed(&signed(s), &raw(s)).unwrap();
    }
    drop(w);
    drop(j);
    let segs = segments(dir.path(), "signing");
    assert!(segs.len() >= 3);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let (at, len) = *frames(&bytes).last().unwrap();
    bytes[at + 8 + len - 1] ^= 0x80;
    std::fs::write(&segs[0], &bytes).unwrap();
    let err = Journal::open(cfg(dir.path(), 4096, SyncPolicy::None)).unwrap_err();
    assert!(
        matches!(&err, JournalError::Corrupt { file, offset, .. } if file == &segs[0] && *offset == at as u64),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Sync policies.

#[test]
fn group_commit_makes_positions_durable_and_wakes_callbacks() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(cfg(
        dir.path(),
        1 << 16,
        SyncPolicy::Group { max_delay_us: 100 },
    ))
    .unwrap();
    let woken = Arc::new(AtomicU64::new(0));
    {
        let woken = Arc::clone(&woken);
        j.on_durable(Box::new(move || {
            woken.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let mut w = j.lane("intake").unwrap();
    let watch = w.durable();
    assert!(watch.waits());
    assert!(watch.is_durable(Pos(0)));
    for round in 0..5u64 {
        let mut last = Pos(0);
        for s in 0..50 {
            last = w
                .append_intent(&intent(round * 50 + s), &calldata(s))
                .unwrap();
        }
        wait_for("the batch to be synced", || watch.is_durable(last));
        assert!(watch.synced() >= last);
    }
    // Past a rotation too.
    let mut last = Pos(0);
    for s in 0..400 {
        last = w
            .append_signed(&signed(s), &raw(s))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_for("the rotated lane to be synced", || watch.is_durable(last));
    wait_for("a wake callback", || woken.load(Ordering::Relaxed) > 0);
    let stats = j.stats();
    assert!(stats.syncs > 0, "{stats:?}");
    assert_eq!(stats.sync_errors, 0);
    assert_eq!(stats.lanes[0].durable, last);
    assert!(stats.lanes[0].segments > 1, "{stats:?}");
}

#[test]
fn without_group_commit_nothing_waits_and_shutdown_syncs() {
    for sync in [SyncPolicy::None, SyncPolicy::Interval { ms: 5 }] {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(cfg(dir.path(), 1 << 16, sync)).unwrap();
        let mut w = j.lane("events").unwrap();
        let watch = w.durable();
        let p = w.append_state(&state(1)).unwrap();
        assert!(!watch.waits());
        assert!(watch.is_durable(p), "{sync:?}: nothing waits");
        if matches!(sync, SyncPolicy::Interval { .. }) {
            wait_for("the interval sync", || watch.synced() >= p);
        }
        j.shutdown();
        assert!(watch.synced() >= p, "{sync:?}: shutdown syncs");
    }
}

// ---------------------------------------------------------------------------------------
// Compaction.

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg") || n.ends_with(".tmp"))
        .collect();
    v.sort();
    v
}

#[test]
fn compaction_keeps_exactly_the_given_records_and_removes_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 8192, SyncPolicy::Group { max_delay_us: 50 });
    let (j, _) = Journal::open(c.clone()).unwrap();
    append_range(&j, 0..200);
    drop(j);
    let before = names(dir.path());
    assert!(before.len() > 9, "{before:?}");
    let old_max = before
        .iter()
        .map(|n| n[n.len() - 14..n.len() - 4].to_owned())
        .max()
        .unwrap();

    let (j, replay) = Journal::open(c.clone()).unwrap();
    // Keep what a recovery would: the records of live intents (seq >= 150) whole, and a
    // Done for each finished one.
    let mut keep: Vec<OwnedRecord> = (0..150)
        .map(|s| {
            OwnedRecord::Done(DoneRec::new(
                s,
                "desk-a",
                &format!("order-{s}"),
                6,
                0,
                [1; 32],
                s,
            ))
        })
        .collect();
    for l in LANES {
        keep.extend(
            replay
                .lane(l)
                .iter()
                .filter(|(_, r)| r.seq().is_some_and(|s| s >= 150))
                .map(|(_, r)| r.clone()),
        );
    }
    j.compact(keep.clone()).unwrap();
    let after = names(dir.path());
    assert!(after.iter().all(|n| n.starts_with("base-")), "{after:?}");
    assert!(
        after.len() >= 2,
        "the kept records span segments: {after:?}"
    );
    assert!(
        after.iter().all(|n| n[5..15] > *old_max),
        "new numbers: {after:?}"
    );
    // New writers start new segments after the base.
    let mut w = j.lane("intake").unwrap();
    let p = w.append_intent(&intent(500), b"x").unwrap();
    assert!(j.compact(Vec::new()).is_err(), "only before writers");
    drop(w);
    drop(j);

    let (_j, replay) = Journal::open(c).unwrap();
    assert_eq!(
        lane_records(&replay, "base"),
        keep,
        "exactly the kept records, in order"
    );
    let intake = replay.lane("intake");
    assert_eq!(intake.len(), 1);
    assert_eq!(intake[0].0, p);
    assert!(replay.lane("signing").is_empty() && replay.lane("events").is_empty());
}

#[test]
fn a_crash_during_compaction_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 8192, SyncPolicy::None);
    let (j, _) = Journal::open(c.clone()).unwrap();
    append_range(&j, 0..50);
    drop(j);
    let saved = tempfile::tempdir().unwrap();
    for n in names(dir.path()) {
        std::fs::copy(dir.path().join(&n), saved.path().join(&n)).unwrap();
    }
    let all = |r: &Replay| -> Vec<OwnedRecord> {
        LANES.iter().flat_map(|l| lane_records(r, l)).collect()
    };
    let (j, replay) = Journal::open(c.clone()).unwrap();
    let everything = all(&replay);
    let keep: Vec<OwnedRecord> = everything
        .iter()
        .filter(|r| r.seq() >= Some(40))
        .cloned()
        .collect();

    // Crashed before the renames: a temporary file is left; the old journal is whole.
    std::fs::write(dir.path().join("base-0000009999.seg.tmp"), vec![7u8; 4096]).unwrap();
    drop(j);
    let (j, replay) = Journal::open(c.clone()).unwrap();
    assert!(!names(dir.path()).iter().any(|n| n.ends_with(".tmp")));
    assert_eq!(all(&replay), everything);

    // Crashed after the renames, before every old segment was deleted: both are there,
    // nothing is lost (records may be seen twice).
    j.compact(keep.clone()).unwrap();
    drop(j);
    for n in names(saved.path()).iter().rev().take(3) {
        std::fs::copy(saved.path().join(n), dir.path().join(n)).unwrap();
    }
    let (_j, replay) = Journal::open(c).unwrap();
    assert_eq!(lane_records(&replay, "base"), keep);
    assert!(replay.len() > keep.len());
}

// ---------------------------------------------------------------------------------------
// A writer killed with SIGKILL.

const CRASH_DIR: &str = "JOURNAL_STORE_CRASH_DIR";

/// In the child process only (the crash test starts this test binary with `CRASH_DIR`
/// set): appends without end, reporting each position on stdout once `append` returned.
#[test]
fn crash_child_appends_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let (j, _) = Journal::open(cfg(Path::new(&dir), 1 << 16, SyncPolicy::None)).unwrap();
    let mut intake = j.lane("intake").unwrap();
    let mut signing = j.lane("signing").unwrap();
    let mut out = std::io::stdout().lock();
    for seq in 0.. {
        let p = intake.append_intent(&intent(seq), &calldata(seq)).unwrap();
        writeln_flush(&mut out, "intake", p, seq);
        let p = signing.append_signed(&signed(seq), &raw(seq)).unwrap();
        writeln_flush(&mut out, "signing", p, seq);
    }
}

fn writeln_flush(out: &mut impl std::io::Write, lane: &str, p: Pos, seq: u64) {
    writeln!(out, "appended {lane} {} {seq}", p.0).unwrap();
    out.flush().unwrap();
}

#[test]
fn a_sigkilled_writer_loses_no_append_it_reported() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut reported = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Kill it mid-stream, well past a few segment rotations.
    while reported.len() < 6000 {
        assert!(
            Instant::now() < deadline,
            "child too slow: {} lines",
            reported.len()
        );
        let line = lines.next().expect("child output").unwrap();
        if let Some(rest) = line.strip_prefix("appended ") {
            reported.push(rest.to_owned());
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Lines already in the pipe were reported before the kill too.
    for line in lines {
        if let Some(rest) = line.unwrap().strip_prefix("appended ") {
            reported.push(rest.to_owned());
        }
    }
    let (_j, replay) = Journal::open(cfg(dir.path(), 1 << 16, SyncPolicy::None)).unwrap();
    let mut found = std::collections::HashMap::new();
    for l in ["intake", "signing"] {
        for (p, r) in replay.lane(l) {
            found.insert((l.to_owned(), p.0), r.seq().unwrap());
        }
    }
    for r in &reported {
        let mut it = r.split(' ');
        let (lane, pos, seq) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let key = (lane.to_owned(), pos.parse::<u64>().unwrap());
        assert_eq!(
            found.get(&key),
            Some(&seq.parse::<u64>().unwrap()),
            "reported append {r} is missing after the kill"
        );
    }
    assert!(
        segments(dir.path(), "intake").len() > 2,
        "rotated before the kill"
    );
    assert!(replay.len() >= reported.len());
}

// ---------------------------------------------------------------------------------------
// No allocation.

#[test]
fn appending_allocates_nothing() {
    for sync in [SyncPolicy::None, SyncPolicy::Group { max_delay_us: 50 }] {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(cfg(dir.path(), 64 << 20, sync)).unwrap();
        let mut intake = j.lane("intake").unwrap();
        let mut signing = j.lane("signing").unwrap();
        let mut events = j.lane("events").unwrap();
        let data = vec![0xa9u8; 200];
        let tx = vec![0x02u8; 200];
        let (i, s, e) = (intent(1), signed(1), state(1));
        let p = PrincipalRec::new(1, "desk-a");
        let d = DoneRec::new(1, "desk-a", "order-1", 6, 0, [0; 32], 1);
        let mut round = |n: u64| {
            for _ in 0..n {
                intake.append_intent(&i, &data).unwrap();
                signing.append_signed(&s, &tx).unwrap();
                events.append_state(&e).unwrap();
                intake.append_principal(&p).unwrap();
                events.append_done(&d).unwrap();
            }
        };
        round(200);
        ALLOCS.store(0, Ordering::Relaxed);
        COUNTING.with(|c| c.set(true));
        round(2000);
        COUNTING.with(|c| c.set(false));
        assert_eq!(
            ALLOCS.load(Ordering::Relaxed),
            0,
            "{sync:?}: 10,000 appends allocated"
        );
        // The counter does see this thread's allocations.
        COUNTING.with(|c| c.set(true));
        std::hint::black_box(Box::new(1u64));
        COUNTING.with(|c| c.set(false));
        assert_eq!(ALLOCS.load(Ordering::Relaxed), 1);
    }
}
