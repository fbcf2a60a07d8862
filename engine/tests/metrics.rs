//! `/metrics` over HTTP after real traffic (a real anvil and engine): the stage latency
//! histograms, the queue gauges and the throughput counters; and the binary's JSON log
//! lines (`--log-format json`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Harness, http_get, transfers_confirm};
use engine::config::Layout;
use serde_json::Value;
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS};

/// Samples of a Prometheus text page: series (name and labels, as written) → value.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn get(s: &HashMap<String, f64>, series: &str, body: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[test]
fn metrics_after_traffic() {
    let h = Harness::start(Layout::PerStage);
    let before = http_get(h.addr(), "/metrics");
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let n = 5;
    transfers_confirm(&h, "dev0", DEV_ADDRESSES[0], "m", n);

    // `confirmed` is the status thread's event; the counters it bumps are read here.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (body, s) = loop {
        let body = http_get(h.addr(), "/metrics");
        let s = samples(&body);
        if s.get("engine_events_total{state=\"confirmed\"}").copied() >= Some(n as f64)
            || Instant::now() > deadline
        {
            break (body, s);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        body.contains("Content-Type: text/plain") || body.contains("content-type: text/plain"),
        "{body}"
    );

    // Throughput counters.
    assert_eq!(get(&s, "engine_intents_received_total", &body), n as f64);
    for state in ["accepted", "signed", "broadcast", "included", "confirmed"] {
        let v = get(
            &s,
            &format!("engine_events_total{{state=\"{state}\"}}"),
            &body,
        );
        assert_eq!(v, n as f64, "{state}");
    }
    assert_eq!(get(&s, "engine_acks_total", &body), n as f64);
    let public = get(&s, "engine_broadcast_routed_total{route=\"public\"}", &body);
    let private = get(
        &s,
        "engine_broadcast_routed_total{route=\"private\"}",
        &body,
    );
    assert_eq!((public, private), (n as f64, 0.0));
    assert_eq!(get(&s, "engine_private_route_share", &body), 0.0);

    // Stage histograms: every recorder has a full, monotone bucket series ending in
    // +Inf == _count; the stages on the path saw every intent.
    assert!(body.contains("# TYPE engine_stage_latency_seconds histogram\n"));
    let recorders: Vec<String> = s
        .keys()
        .filter_map(|k| {
            k.strip_prefix("engine_stage_latency_seconds_count{recorder=\"")?
                .strip_suffix("\"}")
                .map(str::to_owned)
        })
        .collect();
    for want in [
        "intake.service",
        "policy.service",
        "signing.service",
        "broadcast.service",
        "e2e.ws_to_node",
    ] {
        assert!(recorders.iter().any(|r| r == want), "{want}: {recorders:?}");
    }
    for r in &recorders {
        let count = get(
            &s,
            &format!("engine_stage_latency_seconds_count{{recorder=\"{r}\"}}"),
            &body,
        );
        let sum = get(
            &s,
            &format!("engine_stage_latency_seconds_sum{{recorder=\"{r}\"}}"),
            &body,
        );
        let prefix = format!("engine_stage_latency_seconds_bucket{{recorder=\"{r}\",le=\"");
        let buckets: Vec<(String, f64)> = body
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| {
                let (le, v) = rest.split_once("\"} ").unwrap();
                (le.to_owned(), v.parse().unwrap())
            })
            .collect();
        assert_eq!(buckets.len(), 23, "{r}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{r}: {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap(), &("+Inf".to_owned(), count), "{r}");
        assert!(
            sum >= 0.0 && (count > 0.0 || sum == 0.0),
            "{r}: {sum} {count}"
        );
    }
    for r in ["intake.service", "signing.service", "e2e.ws_to_node"] {
        let count = get(
            &s,
            &format!("engine_stage_latency_seconds_count{{recorder=\"{r}\"}}"),
            &body,
        );
        assert!(count >= n as f64, "{r}: {count}");
        let sum = get(
            &s,
            &format!("engine_stage_latency_seconds_sum{{recorder=\"{r}\"}}"),
            &body,
        );
        assert!(sum > 0.0, "{r}: sum {sum}");
        // A WS-to-node path and a stage's service time both stay well under 10 s.
        let under_10s = get(
            &s,
            &format!("engine_stage_latency_seconds_bucket{{recorder=\"{r}\",le=\"5\"}}"),
            &body,
        );
        assert_eq!(under_10s, count, "{r}");
    }
    // The summary stays, with the same count.
    assert_eq!(
        get(
            &s,
            "engine_latency_seconds_count{recorder=\"intake.service\"}",
            &body
        ),
        get(
            &s,
            "engine_stage_latency_seconds_count{recorder=\"intake.service\"}",
            &body
        )
    );

    // Queue gauges: every ring of the per-stage layout and the audit channel.
    for q in [
        "intake",
        "policy",
        "signing",
        "broadcast",
        "receipts",
        "status",
        "audit",
    ] {
        let depth = get(&s, &format!("engine_queue_depth{{queue=\"{q}\"}}"), &body);
        let cap = get(
            &s,
            &format!("engine_queue_capacity{{queue=\"{q}\"}}"),
            &body,
        );
        assert!(cap > 0.0, "{q}");
        assert!((0.0..=cap).contains(&depth), "{q}: {depth} of {cap}");
    }
    assert!(body.contains("# TYPE engine_queue_depth gauge\n"));

    // Signer and provider health.
    assert!(
        body.contains("engine_signer_info{account=\"dev0\""),
        "{body}"
    );
    assert!(
        s.keys().any(|k| k.starts_with("engine_provider_up{")),
        "{body}"
    );
}

#[test]
fn metrics_log_format_json_from_the_binary() {
    let anvil = Anvil::spawn(&AnvilConfig::default()).expect("anvil starts (run scripts/setup.sh)");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("engine.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\njwt_secret = \"{}\"\nnode_ws_url = \"{}\"\n\n[[accounts]]\nname = \"dev0\"\nmax_value_wei = \"1000\"\nallowlist = [\"{}\"]\n[accounts.key]\nbackend = \"local\"\nsecret_hex = \"{}\"\n",
            common::SECRET,
            anvil.ws_url(),
            DEV_ADDRESSES[5],
            DEV_PRIVATE_KEYS[0]
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("ENGINE_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("engine binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The engine logs one `custody` line per account as it starts.
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let parsed: Result<Value, _> = serde_json::from_str(&line);
                seen.push(line);
                if let Ok(v) = parsed
                    && v["fields"]["message"] == "custody"
                {
                    break Some(v);
                }
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let v = found.unwrap_or_else(|| panic!("no JSON custody line; stderr:\n{}", seen.join("\n")));
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["account"], "dev0");
    assert!(v["timestamp"].is_string() && v["target"].is_string(), "{v}");
    // Every line before it is JSON too.
    for l in &seen {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
}

#[test]
fn metrics_log_format_unknown_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["--log-format", "xml", "token", "--sub", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown log format `xml`"));
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["token", "--sub", "x"])
        .env("ENGINE_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ENGINE_LOG_FORMAT: unknown log format `yaml`")
    );
}
