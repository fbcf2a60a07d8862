//! Crash recovery with a real process and a real anvil: the engine (`engine run`, with a
//! journal) is killed with SIGKILL at random moments while a desk streams intents. After
//! each restart the desk resubmits every intent it has not seen acked, and some it has;
//! at the end the chain is the judge:
//!
//! - every acked intent is on chain exactly once, or ended `failed`/`rejected` and is not
//!   on chain at all (losses = 0, duplicates = 0);
//! - every transfer on chain from the engine's accounts belongs to exactly one intent;
//! - a resubmitted id that was acked before is answered as a duplicate with its sequence
//!   number, never as a second intent.
//!
//! `CRASH_POINTS` sets the number of kills (default 20; `./x soak` runs more) and
//! `CRASH_SEED` the random seed (printed, so a failing run can be replayed).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::auth::{JwtAuth, Roles};
use engine::desk::Desk;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS};

const SECRET: &str = "crash-test-secret-0123456789abcdef";
/// Transfers carry value `MARK + k` wei for intent `k`, so the chain says which intent
/// each transaction belongs to.
const MARK: u128 = 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// Sent; no answer seen (the engine may or may not have journaled it).
    Sent,
    /// Acked under this sequence number.
    Acked(u64),
    /// Refused at the edge (`error`): never accepted.
    Refused,
}

struct Engine {
    child: Child,
    url: String,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A failing test must not leave an engine running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_engine(config: &Path, log: &Path) -> Engine {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("engine binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("desk URL: ") {
                let _ = tx.send(url.to_owned());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "engine did not start; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    };
    Engine { child, url }
}

fn kill9(e: &mut Engine) {
    // SAFETY: plain syscall on a child we own; the pid is alive until we wait for it.
    unsafe {
        libc::kill(e.child.id() as i32, libc::SIGKILL);
    }
    let _ = e.child.wait();
}

/// With `CRASH_KEEP`: a copy of the journal as the engine finds it at start `life`.
fn snapshot(root: &Path, life: usize) {
    let from = root.join("journal");
    let Ok(dir) = std::fs::read_dir(&from) else {
        return;
    };
    let to = root.join(format!("journal-at-start-{life:03}"));
    std::fs::create_dir_all(&to).unwrap();
    for f in dir.map_while(Result::ok) {
        let _ = std::fs::copy(f.path(), to.join(f.file_name()));
    }
}

fn write_config(dir: &Path, anvil: &Anvil) -> std::path::PathBuf {
    let mut accounts = String::new();
    for (i, key) in DEV_PRIVATE_KEYS.iter().enumerate().take(2) {
        accounts.push_str(&format!(
            "[[accounts]]\nname = \"dev{i}\"\nmax_value_wei = \"1000000000000000000\"\nallowlist = [\"{}\"]\n[accounts.key]\nbackend = \"local\"\nsecret_hex = \"{key}\"\n\n",
            DEV_ADDRESSES[5]
        ));
    }
    let text = format!(
        "listen = \"127.0.0.1:0\"\njwt_secret = \"{SECRET}\"\nnode_ws_url = \"{}\"\nconfirmations = 1\n\n[journal]\ndir = \"{}\"\nsegment_bytes = 262144\ncompact_every_ms = 200\n\n{accounts}",
        anvil.ws_url(),
        dir.join("journal").display()
    );
    let p = dir.join("engine.toml");
    std::fs::write(&p, text).unwrap();
    // It holds the JWT secret: the engine reads it only if its owner alone may.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn intent(k: u64) -> Value {
    let id = format!("c{k}");
    json!({"op": "submit", "req": id, "intent": {
        "id": id, "account": format!("dev{}", k % 2), "kind": "transfer",
        "to": DEV_ADDRESSES[5], "value_wei": (MARK + u128::from(k)).to_string()}})
}

fn id_of(f: &Value) -> Option<u64> {
    f["id"].as_str()?.strip_prefix('c')?.parse().ok()
}

/// Applies one frame from the engine to the ledger; counts duplicate answers.
fn note(f: &Value, seen: &mut BTreeMap<u64, Seen>, dups: &mut u64) {
    let Some(k) = id_of(f) else {
        return;
    };
    match f["op"].as_str() {
        Some("ack") => {
            let seq = f["seq"].as_u64().expect("ack has seq");
            if f["duplicate"] == true {
                *dups += 1;
            }
            match seen.get(&k) {
                Some(Seen::Acked(s)) => assert_eq!(
                    *s, seq,
                    "id c{k} was acked as {s} and is now answered as {seq}: a second intent"
                ),
                _ => {
                    seen.insert(k, Seen::Acked(seq));
                }
            }
        }
        Some("error") if seen.get(&k) == Some(&Seen::Sent) => {
            seen.insert(k, Seen::Refused);
        }
        _ => {}
    }
}

/// One life of the engine: resubmit, stream new intents for `run_for`, then return
/// (the caller kills the process).
async fn desk_life(
    url: &str,
    token: &str,
    seen: &mut BTreeMap<u64, Seen>,
    next: &mut u64,
    dups: &mut u64,
    resubmit_acked: usize,
    run_for: Duration,
) {
    let Ok(desk) = Desk::connect(url, Some(token)).await else {
        return;
    };
    let (mut tx, mut rx) = desk.split();
    // Everything not seen acked, plus a few acked ones: the engine must answer those as
    // duplicates of the same sequence.
    let mut again: Vec<u64> = seen
        .iter()
        .filter(|(_, s)| **s == Seen::Sent)
        .map(|(k, _)| *k)
        .collect();
    again.extend(
        seen.iter()
            .filter(|(_, s)| matches!(s, Seen::Acked(_)))
            .map(|(k, _)| *k)
            .rev()
            .take(resubmit_acked),
    );
    for k in again {
        if tx.send(&intent(k)).await.is_err() {
            return;
        }
    }
    let deadline = Instant::now() + run_for;
    let mut outstanding = 0u32;
    loop {
        while outstanding < 8 && Instant::now() < deadline {
            let k = *next;
            *next += 1;
            seen.insert(k, Seen::Sent);
            if tx.send(&intent(k)).await.is_err() {
                return;
            }
            outstanding += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Read what is already there, then let the caller kill the engine mid-stream.
            while let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(1), rx.recv()).await {
                note(&f, seen, dups);
            }
            return;
        }
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(f)) => {
                if f["op"] == "ack" && f["duplicate"] != true {
                    outstanding = outstanding.saturating_sub(1);
                }
                note(&f, seen, dups);
            }
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
}

/// Asks `status` for `k` until it is final; its final state.
async fn final_state(desk: &mut Desk, k: u64, until: Instant) -> String {
    loop {
        let id = format!("c{k}");
        desk.send(&json!({"op": "status", "req": id, "id": id}))
            .await
            .unwrap();
        let f = loop {
            let f = tokio::time::timeout(Duration::from_secs(10), desk.recv())
                .await
                .expect("status answered")
                .unwrap();
            if f["req"] == id.as_str() {
                break f;
            }
        };
        let state = f["state"].as_str().unwrap_or("").to_owned();
        if matches!(
            state.as_str(),
            "confirmed" | "failed" | "rejected" | "cancelled"
        ) {
            return state;
        }
        assert!(
            Instant::now() < until,
            "intent c{k} did not settle; last answer {f}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn killed_at_random_moments_nothing_acked_is_lost_or_sent_twice() {
    let points: usize = std::env::var("CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {points} crash points, CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(200)))
        .expect("anvil starts (run scripts/setup.sh)");
    // CRASH_KEEP=1 keeps the folder (journal, engine log, and the journal as each start
    // found it) for a look afterwards.
    let tmp = tempfile::tempdir().unwrap();
    let (root, _tmp) = if std::env::var_os("CRASH_KEEP").is_some() {
        let p = tmp.keep();
        eprintln!("crash test folder (kept): {}", p.display());
        (p, None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    let config = write_config(&root, &anvil);
    let log = root.join("engine.log");
    let token = JwtAuth::new(SECRET.as_bytes()).issue("desk-a", Roles::all(), 3600);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();
    let mut next = 0u64;
    let mut dups = 0u64;
    let keep = std::env::var_os("CRASH_KEEP").is_some();
    for point in 0..points {
        if keep {
            snapshot(&root, point);
        }
        let mut e = start_engine(&config, &log);
        let run_for = Duration::from_millis(rng.gen_range(20..400));
        rt.block_on(desk_life(
            &e.url, &token, &mut seen, &mut next, &mut dups, 3, run_for,
        ));
        kill9(&mut e);
        eprintln!(
            "crash point {point}: killed after {run_for:?}; {} intents sent so far, {} acked",
            seen.len(),
            seen.values()
                .filter(|s| matches!(s, Seen::Acked(_)))
                .count()
        );
    }

    // The last life: resubmit what is unanswered, then let everything settle.
    if keep {
        snapshot(&root, points);
    }
    let mut e = start_engine(&config, &log);
    let before = next;
    rt.block_on(desk_life(
        &e.url,
        &token,
        &mut seen,
        &mut next,
        &mut dups,
        10,
        Duration::from_millis(300),
    ));
    // Anything still unanswered gets one more try, with time to answer.
    let url = e.url.clone();
    let finals: HashMap<u64, String> = rt.block_on(async {
        let mut desk = Desk::connect(&url, Some(&token)).await.unwrap();
        let pending: Vec<u64> = seen
            .iter()
            .filter(|(_, s)| **s == Seen::Sent)
            .map(|(k, _)| *k)
            .collect();
        for k in pending {
            desk.send(&intent(k)).await.unwrap();
            loop {
                let f = tokio::time::timeout(Duration::from_secs(10), desk.recv())
                    .await
                    .expect("resubmission answered")
                    .unwrap();
                if id_of(&f) == Some(k) && (f["op"] == "ack" || f["op"] == "error") {
                    note(&f, &mut seen, &mut dups);
                    break;
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(120);
        let mut finals = HashMap::new();
        let acked: Vec<u64> = seen
            .iter()
            .filter(|(_, s)| matches!(s, Seen::Acked(_)))
            .map(|(k, _)| *k)
            .collect();
        for k in acked {
            finals.insert(k, final_state(&mut desk, k, until).await);
        }
        finals
    });
    assert!(next >= before);

    // The chain: which intents' transfers it holds, and how often.
    let mut rpc = anvil.rpc().unwrap();
    let head = rpc.block_number().unwrap();
    let ours: Vec<String> = DEV_ADDRESSES[..2]
        .iter()
        .map(|a| a.to_string().to_lowercase())
        .collect();
    let mut on_chain: HashMap<u64, u32> = HashMap::new();
    let mut strangers = 0;
    for n in 0..=head {
        let b: Value = rpc
            .call("eth_getBlockByNumber", json!([format!("0x{n:x}"), true]))
            .unwrap();
        for t in b["transactions"].as_array().cloned().unwrap_or_default() {
            let from = t["from"].as_str().unwrap_or("").to_lowercase();
            if !ours.contains(&from) {
                continue;
            }
            let v = u128::from_str_radix(
                t["value"]
                    .as_str()
                    .unwrap_or("0x0")
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap_or(0);
            if v >= MARK && v < MARK + u128::from(next) {
                *on_chain.entry((v - MARK) as u64).or_default() += 1;
            } else if v != 0 {
                // Zero-value self-transfers fill nonces; anything else is unexplained.
                strangers += 1;
            }
        }
    }
    let acked: Vec<u64> = seen
        .iter()
        .filter(|(_, s)| matches!(s, Seen::Acked(_)))
        .map(|(k, _)| *k)
        .collect();
    let mut lost = Vec::new();
    let mut twice = Vec::new();
    let mut misreported = Vec::new();
    let (mut confirmed, mut failed) = (0, 0);
    for k in &acked {
        let n = on_chain.get(k).copied().unwrap_or(0);
        match (finals.get(k).map(String::as_str), n) {
            (Some("confirmed"), 1) => confirmed += 1,
            (Some("failed" | "rejected" | "cancelled"), 0) => failed += 1,
            // Acked, not on chain, and not said to have failed: lost.
            (_, 0) => lost.push((*k, finals.get(k).cloned())),
            (_, 1) => misreported.push((*k, finals.get(k).cloned())),
            (_, n) => twice.push((*k, n)),
        }
    }
    let unacked_on_chain: Vec<u64> = on_chain
        .keys()
        .filter(|k| !matches!(seen.get(k), Some(Seen::Acked(_))))
        .copied()
        .collect();
    eprintln!(
        "crash test summary: crash points {points}, intents sent {}, acked {}, confirmed {confirmed}, failed {failed}, duplicate answers to resubmissions {dups}, losses {}, duplicates {}, misreported {}, seed {seed}",
        seen.len(),
        acked.len(),
        lost.len(),
        twice.len(),
        misreported.len()
    );
    let e_log = std::fs::read_to_string(&log).unwrap_or_default();
    let e_tail: String = e_log
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        lost.is_empty(),
        "{} acked intents lost, e.g. {:?}\n{e_tail}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        twice.is_empty(),
        "intents on chain more than once: {twice:?}\n{e_tail}"
    );
    assert!(
        misreported.is_empty(),
        "{} intents on chain whose final state says otherwise, e.g. {:?}\n{e_tail}",
        misreported.len(),
        &misreported[..misreported.len().min(10)]
    );
    assert!(
        unacked_on_chain.is_empty(),
        "transfers on chain for intents never acked: {unacked_on_chain:?}"
    );
    assert_eq!(
        strangers, 0,
        "unexplained transfers from the engine's accounts"
    );
    // The audit trail names the intent of every record it makes about one, those
    // recovered after a kill included.
    let unnamed: Vec<&str> = e_log
        .lines()
        .filter(|l| l.contains("audit"))
        .filter_map(|l| l.find("{\"").map(|i| &l[i..]))
        .filter(|j| j.contains("\"kind\":") && j.contains("\"seq\":") && !j.contains("\"intent\":"))
        .collect();
    assert!(
        unnamed.is_empty(),
        "{} audit records without their intent's id, e.g. {:?}",
        unnamed.len(),
        &unnamed[..unnamed.len().min(3)]
    );
    assert!(dups > 0, "no resubmission was answered as a duplicate");
    assert!(
        acked.len() > points,
        "too few intents acked to mean anything"
    );
    // Clean stop of the last life: SIGTERM, and it exits.
    // SAFETY: plain syscall on a child we own.
    unsafe {
        libc::kill(e.child.id() as i32, libc::SIGTERM);
    }
    let _ = e.child.wait();
}
