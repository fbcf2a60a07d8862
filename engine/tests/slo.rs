//! SLO enforcement against a real anvil and engine: budgets that traffic breaks raise
//! fast-burn alerts on the dashboard feed, their automatic actions demote a provider and
//! move an account to its standby signer (and say why), a budget that holds stays quiet,
//! the alerts resolve once the burn stops, and nothing sent meanwhile is lost.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, http_get, metric, submit, transfer};
use engine::config::{KeyConfig, Layout, ProviderConfig};
use engine::monitor::{BurnAlert, SloAction, SloConfig, StageBudget};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use venues::{AnvilConfig, DEV_PRIVATE_KEYS};

fn budget(
    stage: &str,
    p95_us: Option<f64>,
    p99_us: Option<f64>,
    action: Option<SloAction>,
) -> StageBudget {
    StageBudget {
        stage: stage.into(),
        p95_us,
        p99_us,
        window_s: 1,
        error_budget: 0.25,
        action,
    }
}

fn start() -> Harness {
    Harness::start_prepared(
        &AnvilConfig::with_block_time(Duration::from_millis(250)),
        Layout::Auto,
        |anvil, c| {
            c.providers = ["prov-a", "prov-b"]
                .iter()
                .map(|n| ProviderConfig {
                    name: (*n).into(),
                    ws_url: anvil.ws_url(),
                })
                .collect();
            c.accounts[0].standby = Some(KeyConfig::Local {
                secret_hex: DEV_PRIVATE_KEYS[0].to_owned(),
            });
            c.failover_retry_ms = 60_000;
            c.slo = SloConfig {
                tick_ms: 200,
                history_ticks: 50,
                fast: BurnAlert {
                    long_s: 3,
                    short_s: 1,
                    burn: 2.0,
                },
                slow: BurnAlert {
                    long_s: 6,
                    short_s: 2,
                    burn: 1.5,
                },
                action_cooldown_s: 3600,
                budgets: vec![
                    // 1 ns: every window with traffic breaks it.
                    budget(
                        "e2e.ws_to_wire",
                        None,
                        Some(0.001),
                        Some(SloAction::DemoteProvider),
                    ),
                    budget(
                        "signing.sign_call",
                        Some(0.001),
                        None,
                        Some(SloAction::FailOverSigner),
                    ),
                    // 10 s: holds.
                    budget(
                        "intake.service",
                        Some(10_000_000.0),
                        Some(10_000_000.0),
                        None,
                    ),
                ],
            };
        },
    )
}

fn has(frames: &[Value], pred: impl Fn(&Value) -> bool) -> bool {
    frames.iter().any(pred)
}

fn alert(f: &Value, stage: &str, severity: &str, state: &str) -> bool {
    f["type"] == "slo_alert"
        && f["stage"] == stage
        && f["severity"] == severity
        && f["state"] == state
}

#[test]
fn burning_budgets_alert_act_and_resolve_while_a_held_one_stays_quiet() {
    let h = start();
    let feed_url = format!("ws://{}/v1/dashboard/feed", h.addr());
    let sent = 30usize;
    let frames: Vec<Value> = h.rt.block_on(async {
        let (mut feed, _) = tokio_tungstenite::connect_async(feed_url.as_str())
            .await
            .expect("the dashboard feed accepts a WebSocket");
        let mut frames = Vec::new();
        let mut next_frame = async || -> Value {
            let m = tokio::time::timeout(Duration::from_secs(20), feed.next())
                .await
                .expect("a feed frame within 20 s")
                .expect("the feed stays open")
                .expect("a good frame");
            match m {
                Message::Text(t) => serde_json::from_str(&t).expect("feed frames are JSON"),
                other => panic!("unexpected feed frame {other:?}"),
            }
        };
        let hello = next_frame().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["interval_ms"], 200);

        // Traffic: one transfer every 100 ms from dev0 (the account with a standby).
        let mut desk = engine::desk::Desk::connect(&h.url, Some(&h.token))
            .await
            .expect("desk connects");
        let began = Instant::now();
        let mut i = 0;
        let mut next_send = Instant::now();
        let burning = |frames: &[Value]| {
            has(frames, |f| alert(f, "e2e.ws_to_wire", "fast", "firing"))
                && has(frames, |f| alert(f, "signing.sign_call", "fast", "firing"))
                && has(frames, |f| {
                    f["type"] == "slo_action" && f["action"] == "demote_provider"
                })
                && has(frames, |f| {
                    f["type"] == "slo_action" && f["action"] == "fail_over_signer"
                })
        };
        while i < sent || !burning(&frames) {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "no alerts and actions after 60 s of breaking traffic; feed events: {:?}",
                frames
                    .iter()
                    .filter(|f| f["type"] != "tick")
                    .collect::<Vec<_>>()
            );
            if i < sent && Instant::now() >= next_send {
                desk.send(&submit(transfer(
                    &format!("slo-{i}"),
                    "dev0",
                    5 + i % 5,
                    1_000,
                )))
                .await
                .unwrap();
                i += 1;
                next_send += Duration::from_millis(100);
            }
            if let Ok(f) = tokio::time::timeout(Duration::from_millis(20), next_frame()).await {
                frames.push(f);
            }
        }
        // Quiet now: the fast alerts resolve once the short window holds good windows.
        let quiet = Instant::now();
        while !(has(&frames, |f| alert(f, "e2e.ws_to_wire", "fast", "resolved"))
            && has(&frames, |f| {
                alert(f, "signing.sign_call", "fast", "resolved")
            }))
        {
            assert!(
                quiet.elapsed() < Duration::from_secs(30),
                "the fast alerts did not resolve within 30 s of quiet"
            );
            frames.push(next_frame().await);
        }
        frames
    });

    let events: Vec<&Value> = frames.iter().filter(|f| f["type"] != "tick").collect();
    // The actions say what they did and why.
    let demote = events
        .iter()
        .find(|f| f["type"] == "slo_action" && f["action"] == "demote_provider")
        .unwrap();
    assert_eq!(demote["done"], true, "{demote}");
    assert_eq!(demote["stage"], "e2e.ws_to_wire");
    let target = demote["target"].as_str().unwrap();
    assert!(["prov-a", "prov-b"].contains(&target), "{demote}");
    let reason = demote["reason"].as_str().unwrap();
    assert!(
        reason.contains("burns its error budget") && reason.contains("slowest smoothed round trip"),
        "{reason}"
    );
    let failover = events
        .iter()
        .find(|f| f["type"] == "slo_action" && f["action"] == "fail_over_signer")
        .unwrap();
    assert_eq!(failover["done"], true, "{failover}");
    assert_eq!(failover["target"], "dev0 (local to local)", "{failover}");
    // The held budget raised nothing.
    assert!(
        !events.iter().any(|f| f["stage"] == "intake.service"),
        "intake.service held its budget: {events:?}"
    );

    // Ticks carry the stages, queues, throughput, SLO rows and providers.
    let ticks: Vec<&Value> = frames.iter().filter(|f| f["type"] == "tick").collect();
    assert!(ticks.len() >= 5, "{} ticks", ticks.len());
    assert!(
        ticks
            .windows(2)
            .all(|w| w[1]["tick"].as_u64() > w[0]["tick"].as_u64())
    );
    assert!(ticks.iter().any(|t| {
        t["stages"].as_array().unwrap().iter().any(|s| {
            s["name"] == "e2e.ws_to_wire"
                && s["count"].as_u64() > Some(0)
                && s["p99_us"].as_f64() > Some(0.0)
        })
    }));
    assert!(
        ticks
            .iter()
            .any(|t| t["throughput"]["received_per_s"].as_f64() > Some(0.0))
    );
    let last = ticks.last().unwrap();
    assert!(
        last["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "audit")
    );
    assert_eq!(last["providers"].as_array().unwrap().len(), 2, "{last}");
    let slo = last["slo"].as_array().unwrap();
    let held = slo.iter().find(|s| s["stage"] == "intake.service").unwrap();
    assert_eq!(
        (held["inside"].clone(), held["alert"].clone()),
        (Value::Bool(true), "none".into())
    );

    // Nothing sent was lost: every transfer was broadcast (through the provider left) and
    // signed (by the standby after the fail-over).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&h, "engine_events_total{state=\"broadcast\"}") < sent as f64 {
        assert!(
            Instant::now() < deadline,
            "not every transfer was broadcast"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(&h, "engine_events_total{state=\"failed\"}"), 0.0);
    assert_eq!(
        metric(&h, "engine_signer_failovers_total{account=\"dev0\"}"),
        1.0
    );
    let demotions = metric(
        &h,
        &format!("engine_provider_demotions_total{{provider=\"{target}\"}}"),
    );
    assert!(demotions >= 1.0, "{target} demoted: {demotions}");
    assert!(metric(&h, "engine_slo_alerts_total") >= 2.0);
    assert_eq!(
        metric(&h, "engine_slo_actions_total{action=\"demote_provider\"}"),
        1.0
    );
    assert_eq!(
        metric(&h, "engine_slo_actions_total{action=\"fail_over_signer\"}"),
        1.0
    );
    assert_eq!(
        metric(&h, "engine_slo_inside{stage=\"intake.service\"}"),
        1.0
    );

    // /v1/slo: the budgets and the same events.
    let body = http_get(h.addr(), "/v1/slo");
    let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["budgets"].as_array().unwrap().len(), 3, "{json}");
    assert!(
        json["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "slo_action")
    );
}

#[test]
fn a_budget_on_an_unknown_stage_is_refused_at_start_by_name() {
    let anvil = venues::Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(250)))
        .expect("anvil starts");
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        common::SECRET.into(),
    );
    cfg.slo.budgets = vec![budget("signing.nonexistent", None, Some(100.0), None)];
    let err = engine::Engine::start(cfg).unwrap_err().to_string();
    assert!(
        err.contains("`signing.nonexistent`") && err.contains("e2e.ws_to_wire"),
        "{err}"
    );
}

#[test]
fn the_dashboard_page_and_feed_are_served() {
    let h = Harness::start(Layout::Auto);
    let page = http_get(h.addr(), "/dashboard");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase().contains("content-type: text/html"),
        "{page}"
    );
    assert!(
        page.contains("/v1/dashboard/feed"),
        "the page reads the feed"
    );
    // The feed without a WebSocket upgrade is refused plainly.
    let plain = http_get(h.addr(), "/v1/dashboard/feed");
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    // Dev mode's budgets are in /v1/slo from the monitor's first tick (1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let slo = http_get(h.addr(), "/v1/slo");
        if slo.contains("\"stage\":\"e2e.ws_to_wire\"")
            && slo.contains("\"stage\":\"signing.sign_call\"")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{slo}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
