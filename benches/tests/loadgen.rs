//! The load generator end to end on a short run: it starts its own dev chain and engine,
//! every intent of the schedule reaches a final state, and the run folder holds the
//! interval logs, percentile tables, summary and plots; `compare` reads two runs;
//! `--baseline` sends the same schedule through the tokio-only baseline and compares.

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .output()
        .expect("loadgen runs")
}

#[test]
fn a_short_sweep_writes_its_reports_and_compare_reads_them() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().to_str().unwrap();
    let o = loadgen(&[
        "--rates",
        "40,80",
        "--duration",
        "2",
        "--settle",
        "30",
        "--connections",
        "2",
        "--report-dir",
        dir,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let run = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    for f in ["machine.md", "curve.md", "curve.svg"] {
        assert!(run.join(f).is_file(), "{f} in {}", run.display());
    }
    for rate in ["rate-40", "rate-80"] {
        let r = run.join(rate);
        for f in [
            "summary.md",
            "summary.json",
            "config.md",
            "percentiles.svg",
            "desk.ack.hlog",
            "desk.ack.hgrm",
            "desk.broadcast.hlog",
            "desk.confirmed.hgrm",
            "loadgen.send_lag.hgrm",
            "engine.e2e.ws_to_wire.hgrm",
        ] {
            assert!(r.join(f).is_file(), "{f} in {}", r.display());
        }
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(s["unfinished"], 0, "{s}");
        let rows = s["rows"].as_array().unwrap();
        let count = |name: &str| {
            rows.iter()
                .find(|x| x["name"] == name)
                .map_or(0, |x| x["count"].as_u64().unwrap())
        };
        let sent = s["sent"].as_u64().unwrap();
        assert!(sent >= 70, "{sent}");
        // Every intent is acked once; each ends confirmed or rejected (the mix has both).
        assert_eq!(count("desk.ack"), sent, "{s}");
        assert_eq!(
            count("desk.confirmed") + count("desk.rejected"),
            sent,
            "{s}"
        );
        assert!(
            count("desk.rejected") > 0 && count("desk.confirmed") > 0,
            "{s}"
        );
        let hlog = std::fs::read_to_string(r.join("desk.ack.hlog")).unwrap();
        assert!(hlog.lines().any(|l| l.starts_with("Tag=ack,")), "{hlog}");
        let svg = std::fs::read_to_string(r.join("percentiles.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("desk.broadcast"),
            "svg"
        );
    }
    let curve = std::fs::read_to_string(run.join("curve.md")).unwrap();
    assert!(
        curve.contains("| 40 |") && curve.contains("| 80 |"),
        "{curve}"
    );
    let o = loadgen(&[
        "compare",
        run.join("rate-40").to_str().unwrap(),
        run.join("rate-80").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| desk.broadcast |"), "{table}");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let o = loadgen(&["--rates", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rates"));
    let o = loadgen(&["--profile", "zigzag"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--profile"));
}

#[test]
fn baseline_runs_the_same_schedule_and_is_compared_with_the_engine() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().to_str().unwrap();
    let o = loadgen(&[
        "--rates",
        "25,50",
        "--duration",
        "3",
        "--settle",
        "30",
        "--connections",
        "1",
        "--baseline",
        "--report-dir",
        dir,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let run = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let summary = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    let count = |s: &serde_json::Value, name: &str| {
        s["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .map_or(0, |x| x["count"].as_u64().unwrap())
    };
    for rate in ["rate-25", "rate-50"] {
        let r = run.join(rate);
        let b = r.join("baseline");
        for f in [
            "summary.md",
            "summary.json",
            "config.md",
            "percentiles.svg",
            "desk.ack.hlog",
            "desk.broadcast.hgrm",
            "desk.confirmed.hgrm",
        ] {
            assert!(b.join(f).is_file(), "{f} in {}", b.display());
        }
        // The baseline has no engine stages of its own.
        assert!(!b.join("engine.e2e.ws_to_wire.hgrm").exists());
        let (e, s) = (summary(&r), summary(&b));
        // The identical schedule: as many intents, every one acked and finished, the same
        // ones refused by policy.
        assert_eq!(s["sent"], e["sent"], "{s}");
        assert_eq!(s["unfinished"], 0, "{s}");
        let sent = s["sent"].as_u64().unwrap();
        assert_eq!(count(&s, "desk.ack"), sent, "{s}");
        assert!(count(&s, "desk.broadcast") > 0, "{s}");
        assert!(count(&s, "desk.confirmed") > 0, "{s}");
        assert_eq!(
            count(&s, "desk.confirmed") + count(&s, "desk.rejected"),
            sent,
            "{s}"
        );
        assert_eq!(
            count(&s, "desk.rejected"),
            count(&e, "desk.rejected"),
            "{s}"
        );
        let md = std::fs::read_to_string(r.join("summary.md")).unwrap();
        assert!(md.contains("## engine vs tokio-only baseline"), "{md}");
        for state in ["ack", "broadcast", "confirmed"] {
            assert!(md.contains(&format!("| {state} |")), "{md}");
        }
        assert!(md.contains("baseline/engine"), "{md}");
    }
    let curve = std::fs::read_to_string(run.join("curve.md")).unwrap();
    assert!(
        curve.contains("## engine vs tokio-only baseline")
            && curve.contains("| 25 | broadcast |")
            && curve.contains("| 50 | confirmed |"),
        "{curve}"
    );
    // A baseline folder is a run folder `compare` reads.
    let r = run.join("rate-50");
    let o = loadgen(&[
        "compare",
        r.to_str().unwrap(),
        r.join("baseline").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| desk.confirmed |"), "{table}");
}
