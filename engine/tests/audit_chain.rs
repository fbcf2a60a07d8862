//! The hash-chained audit log on real files: an intact chain verifies; an altered, deleted
//! or moved record is found and named; a torn last line is cut on restart and the chain
//! goes on; segments rotate and link; signed heads check against the right key only; a key
//! file others may read is refused; export filters; the `engine audit` command's exit
//! code and message; a sealed (encrypted) log verifies and exports with its KEK and the
//! command asks for the KEK without one; and the trail a real engine on anvil leaves.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use engine::audit::{
    AccountMatch, AuditKey, ChainWriter, ExportFilter, Problem, WriterOptions, export, verify,
};
use engine::auth::Principals;
use engine::msg::{IntentId, Origin, State, StatusKind, StatusMsg};
use engine::risk::audit::{
    AccountInfo, AuditContext, AuditKind, AuditRecord, AuditStats, StatusAudit, WriterConfig,
    channel, spawn_writer,
};
use serde_json::{Map, Value, json};

const SEGMENT_1: &str = "audit-00000001.jsonl";

fn fields(i: u64) -> Map<String, Value> {
    let Value::Object(m) = json!({"i": i, "note": format!("record number {i}")}) else {
        unreachable!()
    };
    m
}

/// A log of `n` test records after the head and the `log_open` record.
fn write_log(dir: &Path, opts: WriterOptions, n: u64) -> ChainWriter {
    let mut w = ChainWriter::open(dir, opts).unwrap();
    for i in 0..n {
        w.append(0, "test", &fields(i)).unwrap();
    }
    w.sync().unwrap();
    w
}

fn segment(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn body(line: &str) -> Value {
    serde_json::from_str::<Value>(line).unwrap()["rec"].clone()
}

#[test]
fn an_intact_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_log(dir.path(), WriterOptions::default(), 40);
    let last = w.last_hash();
    drop(w);
    let s = verify(dir.path(), None, None).unwrap();
    // The head, the log_open record, 40 records.
    assert_eq!((s.records, s.segments), (42, 1));
    assert_eq!(s.last_hash, last);
    assert_eq!(s.incomplete_tail_bytes, 0);

    // Every line is exactly {"hash":…,"rec":…}; the body starts with n, prev, at, kind.
    let all = lines(&segment(dir.path(), SEGMENT_1));
    assert!(all[0].starts_with("{\"hash\":\""));
    let first = body(&all[0]);
    assert_eq!(first["kind"], "segment_head");
    assert_eq!(first["n"], 0);
    assert_eq!(first["prev"], "0".repeat(64));
    assert_eq!(first["segment"], 1);
    assert_eq!(first["prev_segment_last_hash"], "0".repeat(64));
    assert!(
        all[0].contains("\"rec\":{\"n\":0,\"prev\":\""),
        "{}",
        all[0]
    );
    let at = first["at"].as_str().unwrap();
    assert!(
        at.ends_with('Z') && at.len() == "2026-12-01T06:05:12.123456789Z".len(),
        "{at}"
    );
    assert_eq!(body(&all[1])["kind"], "log_open");
    // prev of each record is the hash of the one before.
    for pair in all.windows(2) {
        let before: Value = serde_json::from_str(&pair[0]).unwrap();
        assert_eq!(body(&pair[1])["prev"], before["hash"]);
    }
}

#[test]
fn a_flipped_byte_in_a_middle_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 30));
    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    // Line 17 is record 16 (test record 14): change one character of its note.
    let line = &all[16];
    let at = line.find("record number 14").unwrap() + "record number ".len();
    let mut bytes = line.clone().into_bytes();
    bytes[at] = b'7';
    all[16] = String::from_utf8(bytes).unwrap();
    write_lines(&path, &all);
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!(
        (b.file.as_str(), b.line, b.record),
        (SEGMENT_1, 17, Some(16))
    );
    assert_eq!(b.problem, Problem::HashMismatch);
    assert_eq!(
        b.to_string(),
        "audit-00000001.jsonl line 17 (record 16): hash mismatch (the record was altered)"
    );

    // A flipped digit of the stored hash is found the same way.
    std::fs::remove_dir_all(dir.path()).unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 30));
    let mut all = lines(&path);
    let mut bytes = all[9].clone().into_bytes();
    bytes[12] = if bytes[12] == b'0' { b'1' } else { b'0' };
    all[9] = String::from_utf8(bytes).unwrap();
    write_lines(&path, &all);
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!(
        (b.line, b.record, &b.problem),
        (10, Some(9), &Problem::HashMismatch)
    );
}

#[test]
fn a_deleted_line_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 30));
    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    all.remove(12); // record 12
    write_lines(&path, &all);
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!((b.line, b.record), (13, Some(13)));
    assert_eq!(
        b.problem,
        Problem::Deleted {
            prev: 11,
            found: 13
        }
    );
    assert_eq!(
        b.to_string(),
        "audit-00000001.jsonl line 13 (record 13): record number 13 follows 11 (a record was deleted)"
    );
}

#[test]
fn swapped_lines_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 30));
    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    all.swap(20, 21);
    write_lines(&path, &all);
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!((b.line, b.record), (21, Some(21)));
    assert_eq!(
        b.problem,
        Problem::Reordered {
            expected: 20,
            found: 21
        }
    );
}

#[test]
fn a_record_renumbered_and_rehashed_breaks_the_prev_link() {
    // Record 12 removed, record 13 renumbered 12 with its hash recomputed: only its
    // `prev` (the hash of the removed record) gives it away.
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 30));
    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    let moved = all.remove(13);
    let (_, rest) = moved.split_at("{\"hash\":\"".len() + 64 + "\",\"rec\":".len());
    let body = rest[..rest.len() - 1].replacen("{\"n\":13,", "{\"n\":12,", 1);
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut prev = [0u8; 32];
    hex::decode_to_slice(v["prev"].as_str().unwrap(), &mut prev).unwrap();
    let hash = engine::audit::record_hash(&prev, body.as_bytes());
    all[12] = engine::audit::format_line(&hash, &body)
        .trim_end()
        .to_owned();
    write_lines(&path, &all);
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!(
        (b.line, b.record, &b.problem),
        (13, Some(12), &Problem::PrevMismatch)
    );
    assert!(
        b.to_string().ends_with(
            "prev does not match the hash of the record before (records reordered or removed)"
        ),
        "{b}"
    );
}

#[test]
fn a_torn_last_line_is_cut_on_restart_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 10));
    let path = segment(dir.path(), SEGMENT_1);
    let text = std::fs::read(&path).unwrap();
    let last_start = text[..text.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    let last_len = text.len() - last_start;
    let keep = last_start + last_len / 2;
    std::fs::write(&path, &text[..keep]).unwrap();
    let torn = (keep - last_start) as u64;

    // Before the restart the log checks out up to the torn line, which is left out.
    let s = verify(dir.path(), None, None).unwrap();
    assert_eq!((s.records, s.incomplete_tail_bytes), (11, torn));

    let mut w = ChainWriter::open(dir.path(), WriterOptions::default()).unwrap();
    assert_eq!(w.recovery().torn_bytes, torn);
    assert_eq!(w.recovery().torn_lines, 1);
    assert_eq!(w.recovery().records_before, 11);
    for i in 100..105 {
        w.append(0, "test", &fields(i)).unwrap();
    }
    drop(w);
    let s = verify(dir.path(), None, None).unwrap();
    assert_eq!((s.records, s.incomplete_tail_bytes), (17, 0));
    let all = lines(&path);
    let open = body(&all[11]);
    assert_eq!(open["kind"], "log_open");
    assert_eq!(open["n"], 11);
    assert_eq!(open["torn_bytes_cut"], torn);
}

#[test]
fn an_empty_newest_segment_gets_its_head_on_restart() {
    // The process stopped right after creating a segment file, before its head.
    let dir = tempfile::tempdir().unwrap();
    let w = write_log(dir.path(), WriterOptions::default(), 5);
    let last = hex::encode(w.last_hash());
    drop(w);
    let empty = segment(dir.path(), "audit-00000002.jsonl");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(verify(dir.path(), None, None).unwrap().records, 7);

    drop(write_log(dir.path(), WriterOptions::default(), 1));
    let all = lines(&empty);
    let head = body(&all[0]);
    assert_eq!(head["kind"], "segment_head");
    assert_eq!(head["segment"], 2);
    assert_eq!(head["n"], 7);
    assert_eq!(head["prev_segment_last_hash"], last.as_str());
    let s = verify(dir.path(), None, None).unwrap();
    assert_eq!((s.records, s.segments), (10, 2));
}

#[test]
fn rotation_across_small_segments_verifies_and_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions {
        segment_bytes: 1024,
        key: None,
        sealer: None,
    };
    drop(write_log(dir.path(), opts.clone(), 60));
    let segments = engine::audit::list_segments(dir.path()).unwrap();
    assert!(segments.len() >= 5, "{} segments", segments.len());
    let mut n = 0;
    let mut last_hash = "0".repeat(64);
    for (i, (no, path)) in segments.iter().enumerate() {
        assert_eq!(*no, i as u64 + 1);
        let all = lines(path);
        let head = body(&all[0]);
        assert_eq!(head["kind"], "segment_head", "{}", path.display());
        assert_eq!(head["segment"], *no);
        assert_eq!(head["prev_segment_last_hash"], last_hash.as_str());
        assert_eq!(head["n"], n);
        n += all.len() as u64;
        let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
        last_hash = last["hash"].as_str().unwrap().to_owned();
        // Closed segments stop at the first record that reaches the size.
        if i + 1 < segments.len() {
            let size = std::fs::metadata(path).unwrap().len();
            let without_last = size - all.last().unwrap().len() as u64 - 1;
            assert!(size >= 1024 && without_last < 1024, "{size} {without_last}");
        }
    }
    let s = verify(dir.path(), None, None).unwrap();
    assert_eq!((s.records, s.segments), (n, segments.len() as u64));

    // A restart continues in the newest segment, numbers and links intact.
    drop(write_log(dir.path(), opts, 20));
    let s2 = verify(dir.path(), None, None).unwrap();
    let segments2 = engine::audit::list_segments(dir.path()).unwrap();
    let heads = (segments2.len() - segments.len()) as u64;
    assert!(heads > 0);
    assert_eq!(s2.segments, segments2.len() as u64);
    // The log_open record, 20 records, and a head per new segment.
    assert_eq!(s2.records, n + 21 + heads);

    // A segment file removed from the middle is named.
    std::fs::remove_file(segment(dir.path(), "audit-00000003.jsonl")).unwrap();
    let b = verify(dir.path(), None, None).unwrap_err();
    assert_eq!(b.file, "audit-00000004.jsonl");
    assert_eq!(b.problem, Problem::SegmentGap { prev: 2, found: 4 });
}

#[test]
fn signed_heads_verify_against_their_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::from_secret(&B256::repeat_byte(0x42)).unwrap();
    let other = AuditKey::from_secret(&B256::repeat_byte(0x43)).unwrap();
    let opts = WriterOptions {
        segment_bytes: 1024,
        key: Some(key.clone()),
        sealer: None,
    };
    drop(write_log(dir.path(), opts, 30));
    let s = verify(dir.path(), Some(key.address()), None).unwrap();
    assert!(s.segments >= 3);
    assert_eq!(s.signed_heads, s.segments);
    assert_eq!(s.signers, vec![key.address()]);
    // Without --signer, the signatures present are still checked.
    assert_eq!(
        verify(dir.path(), None, None).unwrap().signed_heads,
        s.segments
    );

    let head = body(&lines(&segment(dir.path(), SEGMENT_1))[0]);
    assert_eq!(
        head["signer"].as_str().unwrap().parse::<Address>().unwrap(),
        key.address()
    );
    assert_eq!(head["sig"].as_str().unwrap().len(), 2 + 130);

    let b = verify(dir.path(), Some(other.address()), None).unwrap_err();
    assert_eq!((b.file.as_str(), b.line, b.record), (SEGMENT_1, 1, Some(0)));
    assert_eq!(
        b.problem,
        Problem::WrongSigner {
            expected: other.address(),
            found: key.address()
        }
    );

    // An unsigned log does not pass when a signer is required.
    let plain = tempfile::tempdir().unwrap();
    drop(write_log(plain.path(), WriterOptions::default(), 3));
    let b = verify(plain.path(), Some(key.address()), None).unwrap_err();
    assert_eq!(b.problem, Problem::Unsigned(key.address()));
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("audit.key");
    std::fs::write(&key_path, format!("0x{}\n", "42".repeat(32))).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cfg = engine::dev::dev_config(
        "ws://127.0.0.1:1",
        "127.0.0.1:0".parse().unwrap(),
        "0123456789abcdef0123".into(),
    );
    cfg.audit_dir = Some(dir.path().join("audit"));
    cfg.audit_key_file = Some(key_path.clone());
    let e = WriterConfig::from_config(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("audit_key_file") && e.contains(&key_path.display().to_string()),
        "{e}"
    );
    assert!(e.contains("0644"), "{e}");
    assert!(!e.contains(&"42".repeat(32)), "no key material in errors");

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let w = WriterConfig::from_config(&cfg).unwrap();
    let expected = AuditKey::from_secret(&B256::repeat_byte(0x42)).unwrap();
    assert_eq!(w.key.unwrap().address(), expected.address());
}

/// Two intents through the writer thread the way the engine feeds it: the status
/// thread's records (`StatusAudit`) and the policy stage's decisions.
fn engine_like_log(dir: &Path) -> (Address, Address) {
    let principals = Arc::new(Principals::default());
    let alice = principals.intern("alice");
    let bob = principals.intern("bob");
    let (a0, a1) = (Address::repeat_byte(0xa0), Address::repeat_byte(0xa1));
    let ctx = AuditContext {
        principals,
        accounts: vec![
            AccountInfo {
                name: "hot".into(),
                key_id: "local".into(),
                ..AccountInfo::default()
            },
            AccountInfo {
                name: "cold".into(),
                key_id: "kms:alias/cold".into(),
                standby_key_id: Some("hsm:cold-standby".into()),
                ..AccountInfo::default()
            },
        ],
        venues: vec!["node-0".into(), "node-1".into()],
    };
    let (sink, rx) = channel(64);
    let stats = Arc::new(AuditStats::default());
    let writer = spawn_writer(
        WriterConfig {
            dir: Some(dir.to_path_buf()),
            segment_bytes: 2048,
            fsync_every: Duration::from_millis(100),
            key: None,
            sealer: None,
        },
        rx,
        ctx,
        Arc::clone(&stats),
    )
    .unwrap();
    let mut status = StatusAudit::new(sink.clone(), &[a0, a1]);
    let now = pipeline::now_raw();
    let intents = [
        (1u64, "A-1", alice, 0u16, a0, B256::repeat_byte(1)),
        (2, "B-2", bob, 1, a1, B256::repeat_byte(2)),
    ];
    for (seq, id, p, account, from, hash) in intents {
        let origin = Origin {
            conn: 1,
            principal: p,
        };
        status.on_status(&StatusMsg {
            kind: StatusKind::Ack,
            seq,
            origin,
            id: IntentId::new(id).unwrap(),
            at_raw: now,
            account: engine::msg::AccountIdx(account),
            ..StatusMsg::default()
        });
        sink.record(AuditRecord {
            kind: AuditKind::Decision,
            at_ns: engine::risk::unix_now_ns(),
            seq,
            intent: IntentId::new(id).unwrap(),
            principal: p,
            account,
            outcome: Some(engine::risk::rules::Outcome::Allow),
            policy_version: 1,
            ..AuditRecord::default()
        });
        let ev = |state| StatusMsg {
            tx_hash: hash,
            from,
            nonce: 7,
            venues: 0b10,
            block_number: 100,
            depth: 2,
            ..StatusMsg::event(seq, origin, state, now)
        };
        for state in [
            State::Accepted,
            State::Signed,
            State::Broadcast,
            State::Included,
        ] {
            status.on_status(&ev(state));
        }
        if seq == 1 {
            status.on_status(&StatusMsg {
                tx_hash: B256::ZERO,
                ..ev(State::Confirmed)
            });
        }
    }
    drop((sink, status));
    writer.close();
    assert_eq!(stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    (a0, a1)
}

fn exported(dir: &Path, f: &ExportFilter) -> Vec<Value> {
    let mut out = Vec::new();
    let s = export(dir, f, None, None, &mut out).unwrap();
    let v: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len() as u64, s.exported);
    v
}

fn kinds(v: &[Value]) -> Vec<&str> {
    v.iter().map(|r| r["kind"].as_str().unwrap()).collect()
}

#[test]
fn the_writer_thread_records_every_step_of_an_intent_and_export_filters_by_intent() {
    let dir = tempfile::tempdir().unwrap();
    let (a0, a1) = engine_like_log(dir.path());
    verify(dir.path(), None, None).unwrap();

    let a = exported(
        dir.path(),
        &ExportFilter {
            intent: Some("A-1".into()),
            ..ExportFilter::default()
        },
    );
    assert_eq!(
        kinds(&a),
        [
            "request",
            "decision",
            "signed",
            "broadcast",
            "included",
            "confirmed"
        ]
    );
    for r in &a {
        assert_eq!(r["seq"], 1, "{r}");
        assert_eq!(r["intent"], "A-1", "{r}");
        assert_eq!(r["principal"], "alice", "{r}");
        assert_eq!(r["hash"].as_str().unwrap().len(), 64, "{r}");
    }
    // The request names the account and what the intent asks for.
    assert_eq!(a[0]["account"], "hot", "{}", a[0]);
    assert_eq!(a[0]["intent_kind"], "transfer", "{}", a[0]);
    let signed = &a[2];
    assert_eq!(signed["account"], "hot");
    assert_eq!(signed["address"], json!(a0));
    assert_eq!(signed["from"], json!(a0));
    assert_eq!(signed["key_id"], "local");
    assert_eq!(signed["nonce"], 7);
    assert_eq!(signed["tx_hash"], B256::repeat_byte(1).to_string());
    assert_eq!(a[3]["venues"], json!(["node-1"]));
    // `confirmed` carries no hash of its own: the one included is named.
    assert_eq!(a[5]["tx_hash"], B256::repeat_byte(1).to_string());
    assert_eq!(a[5]["depth"], 2);

    // The exported line is the body as written plus its hash.
    let seg = lines(&segment(dir.path(), SEGMENT_1));
    let request_line = seg
        .iter()
        .find(|l| l.contains("\"kind\":\"request\""))
        .unwrap();
    let v: Value = serde_json::from_str(request_line).unwrap();
    assert_eq!(a[0]["hash"], v["hash"]);
    assert_eq!(a[0]["n"], v["rec"]["n"]);

    // By account address: intent B's records (its request through the decision's account
    // name and the account_key record) and B's account_key record.
    let b = exported(
        dir.path(),
        &ExportFilter {
            account: Some(AccountMatch::Address(a1)),
            ..ExportFilter::default()
        },
    );
    assert_eq!(
        kinds(&b),
        [
            "account_key",
            "request",
            "decision",
            "signed",
            "broadcast",
            "included"
        ]
    );
    assert_eq!(b[0]["key_id"], "kms:alias/cold");
    assert_eq!(b[0]["standby_key_id"], "hsm:cold-standby");
    assert_eq!(b[3]["key_id"], "kms:alias/cold");

    // By principal.
    let bob = exported(
        dir.path(),
        &ExportFilter {
            principal: Some("bob".into()),
            ..ExportFilter::default()
        },
    );
    assert!(bob.iter().all(|r| r["seq"] == 2), "{bob:#?}");
    assert_eq!(bob.len(), 5);
}

#[test]
fn export_filters_by_time_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ChainWriter::open(dir.path(), WriterOptions::default()).unwrap();
    let t = |s: u64| s * 1_000_000_000;
    for (i, secs) in [1_000u64, 2_000, 2_999, 3_000, 4_000].iter().enumerate() {
        w.append(t(*secs), "test", &fields(i as u64)).unwrap();
    }
    drop(w);
    let got = exported(
        dir.path(),
        &ExportFilter {
            since_ns: Some(engine::audit::parse_time("2000").unwrap()),
            until_ns: Some(engine::audit::parse_time("1970-01-01T00:50:00Z").unwrap()),
            ..ExportFilter::default()
        },
    );
    let at: Vec<&str> = got.iter().map(|r| r["at"].as_str().unwrap()).collect();
    assert_eq!(
        at,
        [
            "1970-01-01T00:33:20.000000000Z",
            "1970-01-01T00:49:59.000000000Z"
        ]
    );
    assert_eq!(got[0]["i"], 1);
}

#[test]
fn export_of_a_broken_log_writes_nothing_and_names_the_break() {
    let dir = tempfile::tempdir().unwrap();
    drop(write_log(dir.path(), WriterOptions::default(), 10));
    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    all.remove(10);
    write_lines(&path, &all);
    let mut out = Vec::new();
    let e = export(dir.path(), &ExportFilter::default(), None, None, &mut out).unwrap_err();
    assert!(out.is_empty());
    assert_eq!(
        e.to_string(),
        "audit-00000001.jsonl line 11 (record 11): record number 11 follows 9 (a record was deleted)"
    );
}

#[test]
fn the_audit_command_exits_0_on_an_intact_log_and_1_naming_the_break() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_log(dir.path(), WriterOptions::default(), 20);
    let last = hex::encode(w.last_hash());
    drop(w);
    let bin = env!("CARGO_BIN_EXE_engine");
    let ok = std::process::Command::new(bin)
        .args(["audit", "verify"])
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(
        out.starts_with("audit log intact: 22 records in 1 segments") && out.contains(&last),
        "{out}"
    );

    let exp = std::process::Command::new(bin)
        .args(["audit", "export", "--since", "0"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(exp.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&exp.stdout).lines().count(), 22);

    let path = segment(dir.path(), SEGMENT_1);
    let mut all = lines(&path);
    all[5] = all[5].replace("record number 3", "record number 9");
    write_lines(&path, &all);
    let bad = std::process::Command::new(bin)
        .args(["audit", "verify"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(
            "audit-00000001.jsonl line 6 (record 5): hash mismatch (the record was altered)"
        ),
        "{err}"
    );
    let exp = std::process::Command::new(bin)
        .args(["audit", "export"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(exp.status.code(), Some(1));
    assert!(exp.stdout.is_empty());
}

#[test]
fn a_running_engine_on_anvil_leaves_a_verifiable_trail() {
    use common::*;
    use engine::config::Layout;
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().join("audit");
    let d = audit_dir.clone();
    let mut h = Harness::start_with(Layout::Auto, move |c| {
        c.audit_dir = Some(d);
        c.audit_segment_bytes = 4096;
    });
    let mut desk = h.desk();
    let ids = vec!["aud-1".to_owned(), "aud-2".to_owned()];
    let frames = h.rt.block_on(async {
        desk.send(&submit(transfer("aud-1", "dev0", 5, 1_000)))
            .await
            .unwrap();
        desk.send(&submit(transfer("aud-2", "dev1", 6, 2_000)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    });
    for id in &ids {
        assert_eq!(frames[id].last().unwrap()["state"], "confirmed", "{id}");
    }
    let signed_hash = frames["aud-1"]
        .iter()
        .find(|f| f["state"] == "signed")
        .unwrap()["tx_hash"]
        .clone();
    drop(desk);
    let engine = h.engine.take().unwrap();
    engine.shutdown().unwrap();

    let s = verify(&audit_dir, None, None).unwrap();
    assert!(s.segments >= 2, "{s}");
    let a = exported(
        &audit_dir,
        &ExportFilter {
            intent: Some("aud-1".into()),
            ..ExportFilter::default()
        },
    );
    // The status thread's records in the intent's order; the policy stage's decision
    // (another thread: before or after the request) before the signature.
    let k = kinds(&a);
    let status_side: Vec<&str> = k.iter().copied().filter(|k| *k != "decision").collect();
    assert_eq!(
        status_side,
        ["request", "signed", "broadcast", "included", "confirmed"],
        "{a:#?}"
    );
    let decision = k.iter().position(|k| *k == "decision").expect("decided");
    assert!(decision < k.iter().position(|k| *k == "signed").unwrap());
    assert_eq!(a[decision]["outcome"], "allow");
    let signed = a.iter().find(|r| r["kind"] == "signed").unwrap();
    assert_eq!(signed["tx_hash"], signed_hash);
    assert_eq!(signed["key_id"], "local");
    assert_eq!(signed["account"], "dev0");
    assert_eq!(
        signed["from"].as_str().unwrap().parse::<Address>().unwrap(),
        venues::DEV_ADDRESSES[0]
    );
    let broadcast = a.iter().find(|r| r["kind"] == "broadcast").unwrap();
    assert_eq!(broadcast["venues"], json!(["anvil"]));
    // Every account's key is on record from the start.
    let keys = exported(
        &audit_dir,
        &ExportFilter {
            account: Some(AccountMatch::Name("dev1".into())),
            ..ExportFilter::default()
        },
    );
    assert_eq!(keys[0]["kind"], "account_key");
    assert_eq!(
        keys[0]["address"]
            .as_str()
            .unwrap()
            .parse::<Address>()
            .unwrap(),
        venues::DEV_ADDRESSES[1]
    );
}

/// A KEK in test memory (XOR with a fixed pad: for the format only).
#[derive(Debug)]
struct TestKek;

impl signers::kek::KeyWrap for TestKek {
    fn id(&self) -> &str {
        "test:xor"
    }
    fn wrap(&self, key: &signers::kek::DataKey) -> Result<Vec<u8>, signers::SignerError> {
        Ok(key.bytes().iter().map(|b| b ^ 0x5a).collect())
    }
    fn unwrap(&self, w: &[u8]) -> Result<signers::kek::DataKey, signers::SignerError> {
        let mut k = [0u8; 32];
        k.iter_mut().zip(w).for_each(|(k, w)| *k = w ^ 0x5a);
        Ok(signers::kek::DataKey::new(k))
    }
}

#[test]
fn a_sealed_log_verifies_with_its_kek_and_the_audit_command_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let sealer = engine::atrest::Sealer::new(Arc::new(TestKek));
    let opts = WriterOptions {
        segment_bytes: 1024,
        key: None,
        sealer: Some(sealer.clone()),
    };
    drop(write_log(dir.path(), opts, 20));
    let s = verify(dir.path(), None, Some(&sealer)).unwrap();
    assert!(s.segments >= 2);
    for (_, path) in engine::audit::list_segments(dir.path()).unwrap() {
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(!raw.contains("\"kind\"") && !raw.contains("record number"));
    }
    let mut out = Vec::new();
    let e = export(
        dir.path(),
        &ExportFilter::default(),
        None,
        Some(&sealer),
        &mut out,
    )
    .unwrap();
    assert_eq!(e.exported, s.records);
    assert!(String::from_utf8(out).unwrap().contains("record number 7"));

    let bin = env!("CARGO_BIN_EXE_engine");
    for cmd in ["verify", "export"] {
        let o = std::process::Command::new(bin)
            .args(["audit", cmd])
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{cmd}");
        assert!(o.stdout.is_empty(), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(
                "audit-00000001.jsonl line 1: the segment is encrypted (data key wrapped by `test:xor`) and no [at_rest] key-encryption key is configured"
            ) && err.contains("--config"),
            "{err}"
        );
    }
}
