//! `/metrics` (Prometheus text) and `/v1/latency` (JSON) from the live histograms and the
//! status thread's counters. Rendered on request, off the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use pipeline::LatencyRegistry;
use serde_json::{Value, json};

use crate::msg::{Reason, State};
use crate::stages::status::Counters;

/// Upper bounds (ns) of the `engine_stage_latency_seconds` buckets, `+Inf` aside: fixed,
/// from 1 µs to the recorders' 10 s ceiling.
pub const STAGE_BUCKETS_NS: [u64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// [`STAGE_BUCKETS_NS`] as `le` label values (seconds).
const STAGE_BUCKETS_LE: [&str; 22] = [
    "0.000001", "0.000002", "0.000005", "0.00001", "0.00002", "0.00005", "0.0001", "0.0002",
    "0.0005", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
    "5", "10",
];

/// Prometheus exposition text: per stage recorder a latency histogram and quantiles (both
/// cumulative since start, from one snapshot of the recorders), intents received, and
/// event counters. The histogram's buckets are read off the recorder's cumulative
/// HdrHistogram at scrape time (values at or below each bound, to its 0.1 % resolution),
/// so recording does no extra work for them.
pub fn prometheus(latency: &LatencyRegistry, counters: &Counters) -> String {
    let snaps = latency.snapshot();
    let mut s = String::with_capacity(4096 + snaps.len() * 1536);
    s.push_str(
        "# HELP engine_stage_latency_seconds Latency per stage recorder (cumulative since start).\n",
    );
    s.push_str("# TYPE engine_stage_latency_seconds histogram\n");
    let mut counts = [0u64; STAGE_BUCKETS_NS.len()];
    for snap in &snaps {
        snap.cumulative_counts_at_or_below(&STAGE_BUCKETS_NS, &mut counts);
        for (le, c) in STAGE_BUCKETS_LE.iter().zip(counts) {
            let _ = writeln!(
                s,
                "engine_stage_latency_seconds_bucket{{recorder=\"{}\",le=\"{le}\"}} {c}",
                snap.name
            );
        }
        let count = snap.cumulative.len();
        let _ = writeln!(
            s,
            "engine_stage_latency_seconds_bucket{{recorder=\"{}\",le=\"+Inf\"}} {count}",
            snap.name
        );
        let _ = writeln!(
            s,
            "engine_stage_latency_seconds_sum{{recorder=\"{}\"}} {:.9}",
            snap.name,
            snap.cumulative_sum_ns() as f64 / 1e9
        );
        let _ = writeln!(
            s,
            "engine_stage_latency_seconds_count{{recorder=\"{}\"}} {count}",
            snap.name
        );
    }
    s.push_str(
        "# HELP engine_latency_seconds Latency quantiles per stage recorder (cumulative since start).\n",
    );
    s.push_str("# TYPE engine_latency_seconds summary\n");
    for snap in &snaps {
        let p = snap.percentiles();
        for (q, v) in [
            ("0.5", p.p50_ns),
            ("0.9", p.p90_ns),
            ("0.99", p.p99_ns),
            ("0.999", p.p999_ns),
        ] {
            let _ = writeln!(
                s,
                "engine_latency_seconds{{recorder=\"{}\",quantile=\"{q}\"}} {:.9}",
                snap.name,
                v as f64 / 1e9
            );
        }
        let _ = writeln!(
            s,
            "engine_latency_seconds_sum{{recorder=\"{}\"}} {:.9}",
            snap.name,
            snap.cumulative_sum_ns() as f64 / 1e9
        );
        let _ = writeln!(
            s,
            "engine_latency_seconds_count{{recorder=\"{}\"}} {}",
            snap.name, p.count
        );
    }
    counters_text(
        &mut s,
        &[(
            "engine_intents_received_total",
            "Intent submissions received from desks, before any check.",
            &counters.received,
        )],
    );
    s.push_str(
        "# HELP engine_events_total Intent events by state.\n# TYPE engine_events_total counter\n",
    );
    for st in State::ALL {
        let _ = writeln!(
            s,
            "engine_events_total{{state=\"{}\"}} {}",
            st.as_str(),
            counters.events[st as usize].load(Ordering::Relaxed)
        );
    }
    s.push_str("# HELP engine_refusals_total Rejected and failed intents by reason.\n# TYPE engine_refusals_total counter\n");
    for r in Reason::ALL.iter().skip(1) {
        let _ = writeln!(
            s,
            "engine_refusals_total{{reason=\"{}\"}} {}",
            r.as_str(),
            counters.reasons[*r as usize].load(Ordering::Relaxed)
        );
    }
    counters_text(
        &mut s,
        &[
            ("engine_acks_total", "Intents acknowledged.", &counters.acks),
            (
                "engine_duplicates_total",
                "Resubmissions answered from state.",
                &counters.duplicates,
            ),
            (
                "engine_slow_desk_disconnects_total",
                "Desk connections closed for not reading.",
                &counters.slow_desks,
            ),
        ],
    );
    s
}

/// Gauges of the queues between threads: `(queue, depth, capacity)` each, as
/// `engine_queue_depth` and `engine_queue_capacity`.
pub fn queues_prometheus(queues: &[(&str, usize, usize)]) -> String {
    let mut s = String::with_capacity(256 + queues.len() * 96);
    s.push_str("# HELP engine_queue_depth Messages waiting in a queue between threads (a snapshot).\n# TYPE engine_queue_depth gauge\n");
    for (q, depth, _) in queues {
        let _ = writeln!(s, "engine_queue_depth{{queue=\"{q}\"}} {depth}");
    }
    s.push_str("# HELP engine_queue_capacity Capacity of a queue between threads.\n# TYPE engine_queue_capacity gauge\n");
    for (q, _, capacity) in queues {
        let _ = writeln!(s, "engine_queue_capacity{{queue=\"{q}\"}} {capacity}");
    }
    s
}

/// Appends one Prometheus counter (HELP, TYPE, sample) per `(name, help, value)`.
fn counters_text(s: &mut String, counters: &[(&str, &str, &AtomicU64)]) {
    for (name, help, v) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// The desk edge's limits: frames refused for a rate, upgrades refused for the
/// connection cap, failed TLS handshakes.
pub fn limits_prometheus(l: &crate::limits::Limits, tls_failures: &AtomicU64) -> String {
    let mut s = String::new();
    counters_text(
        &mut s,
        &[
            (
                "engine_rate_limited_total",
                "Desk frames refused (not processed) for a per-connection or per-principal rate.",
                &l.rate_limited,
            ),
            (
                "engine_connections_refused_total",
                "Desk upgrades refused for max_connections_per_principal.",
                &l.connections_refused,
            ),
            (
                "engine_tls_handshake_failures_total",
                "Desk connections closed in the TLS handshake (not TLS 1.3, no or a wrong client certificate).",
                tls_failures,
            ),
        ],
    );
    s
}

/// `/v1/latency`: percentiles in microseconds per recorder.
pub fn latency_json(latency: &LatencyRegistry) -> Value {
    let mut recorders = serde_json::Map::new();
    for snap in latency.snapshot() {
        let p = snap.percentiles();
        recorders.insert(
            snap.name.clone(),
            json!({
                "count": p.count,
                "p50_us": p.p50_ns as f64 / 1e3,
                "p90_us": p.p90_ns as f64 / 1e3,
                "p99_us": p.p99_ns as f64 / 1e3,
                "p999_us": p.p999_ns as f64 / 1e3,
                "max_us": p.max_ns as f64 / 1e3,
            }),
        );
    }
    json!({ "recorders": recorders })
}

/// Risk-engine gauges and counters for `/metrics`: policy version in force, kill switches
/// on, intents waiting for approval, KYT refreshes, audit records.
pub fn risk_prometheus(risk: &crate::risk::RiskAdmin) -> String {
    let mut s = String::with_capacity(1024);
    let kills = risk.kill.active(&risk.account_names);
    let k = &risk.control.kyt_stats;
    let _ = writeln!(
        s,
        "# HELP engine_policy_version Version of the policy the policy stage has in force.\n# TYPE engine_policy_version gauge\nengine_policy_version {}",
        risk.control.active_version()
    );
    let _ = writeln!(
        s,
        "# HELP engine_kill_switches_active Kill switches that are on.\n# TYPE engine_kill_switches_active gauge\nengine_kill_switches_active {}",
        kills.len()
    );
    let _ = writeln!(
        s,
        "# HELP engine_pending_approvals Intents waiting for a four-eyes approval.\n# TYPE engine_pending_approvals gauge\nengine_pending_approvals {}",
        risk.approvals.pending().len()
    );
    for (name, help, v) in [
        ("engine_kyt_loads_total", "KYT snapshots loaded.", &k.loads),
        (
            "engine_kyt_failures_total",
            "KYT refreshes that failed (the previous snapshot ages out).",
            &k.failures,
        ),
    ] {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        s,
        "# HELP engine_kyt_entries Addresses in the KYT snapshot last loaded.\n# TYPE engine_kyt_entries gauge\nengine_kyt_entries {}",
        k.entries.load(Ordering::Relaxed)
    );
    s
}

/// Prometheus text of the broadcast providers and private relays: health, demotion, counters, round trip,
/// hedges, and the share of intents sent through private routes.
pub fn broadcast_prometheus(b: &crate::stages::broadcast::BroadcastStats) -> String {
    let mut s = String::with_capacity(2048);
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    venue_metrics(&mut s, "provider", "RPC provider", &b.providers, true);
    venue_metrics(&mut s, "relay", "private relay", &b.relays, false);
    let _ = writeln!(
        s,
        "# HELP engine_broadcast_private_fallbacks_total Private transactions no relay took, sent publicly at once (public_fallback).\n# TYPE engine_broadcast_private_fallbacks_total counter\nengine_broadcast_private_fallbacks_total {}",
        ld(&b.private_fallbacks)
    );
    let _ = writeln!(
        s,
        "# HELP engine_broadcast_hedges_total Sends to one more provider after the hedge delay.\n# TYPE engine_broadcast_hedges_total counter\nengine_broadcast_hedges_total {}",
        ld(&b.hedges)
    );
    let _ = writeln!(
        s,
        "# HELP engine_broadcast_resends_total Sends repeated elsewhere after a provider was lost.\n# TYPE engine_broadcast_resends_total counter\nengine_broadcast_resends_total {}",
        ld(&b.resends)
    );
    let public = ld(&b.public_routed);
    let private = ld(&b.private_routed);
    let share = if public + private == 0 {
        0.0
    } else {
        private as f64 / (public + private) as f64
    };
    let _ = writeln!(
        s,
        "# HELP engine_broadcast_routed_total Transactions accepted, by route.\n# TYPE engine_broadcast_routed_total counter\nengine_broadcast_routed_total{{route=\"public\"}} {public}\nengine_broadcast_routed_total{{route=\"private\"}} {private}"
    );
    let _ = writeln!(
        s,
        "# HELP engine_private_route_share Share of accepted transactions sent through private relays.\n# TYPE engine_private_route_share gauge\nengine_private_route_share {share:.6}"
    );
    s
}

/// The private relays for `/health`.
pub fn relays_json(b: &crate::stages::broadcast::BroadcastStats) -> Value {
    Value::Array(
        b.relays
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "up": r.up.load(Ordering::Relaxed),
                    "rtt_us": r.rtt_ns.load(Ordering::Relaxed) / 1000,
                    "sent": r.sent.load(Ordering::Relaxed),
                    "first_accepts": r.first_accepts.load(Ordering::Relaxed),
                    "errors": r.errors.load(Ordering::Relaxed),
                    "reconnects": r.reconnects.load(Ordering::Relaxed),
                })
            })
            .collect(),
    )
}

/// The providers for `/health`.
pub fn broadcast_json(b: &crate::stages::broadcast::BroadcastStats) -> Value {
    Value::Array(
        b.providers
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "up": p.up.load(Ordering::Relaxed),
                    "demoted": p.demoted.load(Ordering::Relaxed),
                    "rtt_us": p.rtt_ns.load(Ordering::Relaxed) / 1000,
                    "sent": p.sent.load(Ordering::Relaxed),
                    "first_accepts": p.first_accepts.load(Ordering::Relaxed),
                    "errors": p.errors.load(Ordering::Relaxed),
                    "reconnects": p.reconnects.load(Ordering::Relaxed),
                })
            })
            .collect(),
    )
}

/// Prometheus text of staking: deposit verification, the refresher's reads, the validator
/// watch's alerts, the request fees in force.
pub fn staking_prometheus(st: &crate::staking::StakingStats) -> String {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut s = String::with_capacity(1024);
    for (metric, kind, help, v) in [
        (
            "engine_deposits_verified_total",
            "counter",
            "Deposit intents whose entries all verified (BLS signature, SSZ roots).",
            ld(&st.verifier.verified),
        ),
        (
            "engine_deposits_invalid_total",
            "counter",
            "Deposit intents refused by the deposit verifier.",
            ld(&st.verifier.invalid),
        ),
        (
            "engine_deposit_entries_checked_total",
            "counter",
            "Deposit entries the verifier checked.",
            ld(&st.verifier.entries),
        ),
        (
            "engine_deposit_logs_total",
            "counter",
            "DepositEvent logs read from the deposit contract.",
            ld(&st.refresh.deposit_logs),
        ),
        (
            "engine_validators_known",
            "gauge",
            "Validators with a deposit on chain.",
            ld(&st.refresh.validators),
        ),
        (
            "engine_staking_refresh_errors_total",
            "counter",
            "Failed reads of request fees or deposit logs.",
            ld(&st.refresh.errors),
        ),
        (
            "engine_beacon_errors_total",
            "counter",
            "Failed beacon node polls.",
            ld(&st.refresh.beacon_errors),
        ),
        (
            "engine_validator_alerts_total",
            "counter",
            "Validator alerts (slashed, unexpected exit, balance falling).",
            ld(&st.refresh.alerts),
        ),
    ] {
        let _ = writeln!(
            s,
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {v}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP engine_request_fee_wei Current fee of the EIP-7002/7251 request contracts (-1: not read).\n# TYPE engine_request_fee_wei gauge"
    );
    for (kind, f) in [
        ("withdrawal", &st.fees.withdrawal),
        ("consolidation", &st.fees.consolidation),
    ] {
        let v = f.load(Ordering::Relaxed);
        if v == u64::MAX {
            let _ = writeln!(s, "engine_request_fee_wei{{kind=\"{kind}\"}} -1");
        } else {
            let _ = writeln!(s, "engine_request_fee_wei{{kind=\"{kind}\"}} {v}");
        }
    }
    s
}

/// Prometheus text of the receipts stage: head subscription, reorgs, resends.
pub fn receipts_prometheus(r: &crate::stages::receipts::ReceiptsStats) -> String {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut s = String::with_capacity(1024);
    let _ = writeln!(
        s,
        "# HELP engine_head_subscribed Whether the head subscription is live.\n# TYPE engine_head_subscribed gauge\nengine_head_subscribed {}",
        u8::from(r.subscribed.load(Ordering::Relaxed))
    );
    let _ = writeln!(
        s,
        "# HELP engine_head_block Newest head seen.\n# TYPE engine_head_block gauge\nengine_head_block {}",
        ld(&r.head)
    );
    for (metric, help, v) in [
        (
            "engine_head_resubscribes_total",
            "Head subscriptions resumed after a loss.",
            &r.resubscribes,
        ),
        (
            "engine_reorgs_total",
            "Chain reorganisations seen.",
            &r.reorgs,
        ),
        (
            "engine_reorged_total",
            "Transactions whose block left the canonical chain.",
            &r.reorged,
        ),
        (
            "engine_resent_total",
            "Transactions sent again (reorg, private window passed).",
            &r.resent,
        ),
        (
            "engine_private_fallbacks_total",
            "Private sends that fell back to the public path.",
            &r.private_fallbacks,
        ),
    ] {
        let _ = writeln!(
            s,
            "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric} {}",
            ld(v)
        );
    }
    s
}

/// Gauges and counters of one kind of venue (`kind`: `provider` or `relay`, also the
/// label name), one sample per venue. Demotion applies to providers only.
fn venue_metrics(
    s: &mut String,
    kind: &str,
    what: &str,
    venues: &[crate::stages::broadcast::ProviderStats],
    demotion: bool,
) {
    use crate::stages::broadcast::ProviderStats;
    type Value = fn(&ProviderStats) -> String;
    let rows: [(&str, &str, &str, Value, bool); 9] = [
        (
            "up",
            "gauge",
            "Whether the {} is connected.",
            |p| u8::from(p.up.load(Ordering::Relaxed)).to_string(),
            true,
        ),
        (
            "demoted",
            "gauge",
            "Whether the {} is demoted (ranked last).",
            |p| u8::from(p.demoted.load(Ordering::Relaxed)).to_string(),
            demotion,
        ),
        (
            "rtt_seconds",
            "gauge",
            "Smoothed round trip of the {}'s answers.",
            |p| format!("{:.9}", p.rtt_ns.load(Ordering::Relaxed) as f64 / 1e9),
            true,
        ),
        (
            "sent_total",
            "counter",
            "Transactions written to the {}.",
            |p| p.sent.load(Ordering::Relaxed).to_string(),
            true,
        ),
        (
            "first_accepts_total",
            "counter",
            "Transactions the {} accepted first.",
            |p| p.first_accepts.load(Ordering::Relaxed).to_string(),
            true,
        ),
        (
            "errors_total",
            "counter",
            "Refusals and malformed answers from the {}.",
            |p| p.errors.load(Ordering::Relaxed).to_string(),
            true,
        ),
        (
            "demotions_total",
            "counter",
            "Times the {} was demoted.",
            |p| p.demotions.load(Ordering::Relaxed).to_string(),
            demotion,
        ),
        (
            "disconnects_total",
            "counter",
            "Connections to the {} lost.",
            |p| p.disconnects.load(Ordering::Relaxed).to_string(),
            true,
        ),
        (
            "reconnects_total",
            "counter",
            "Successful reconnects to the {}.",
            |p| p.reconnects.load(Ordering::Relaxed).to_string(),
            true,
        ),
    ];
    for (suffix, typ, help, value, on) in rows {
        if !on {
            continue;
        }
        let metric = format!("engine_{kind}_{suffix}");
        let _ = writeln!(
            s,
            "# HELP {metric} {}\n# TYPE {metric} {typ}",
            help.replace("{}", what)
        );
        for p in venues {
            let _ = writeln!(s, "{metric}{{{kind}=\"{}\"}} {}", p.name, value(p));
        }
    }
}

/// Prometheus text of the write-ahead journal: records and bytes per lane, how far each
/// lane is synced, and the group-commit syncs.
pub fn journal_prometheus(j: &crate::journal::JournalStats) -> String {
    let mut s = String::with_capacity(1024);
    let _ = writeln!(
        s,
        "# HELP engine_journal_records_total Records appended per lane.\n# TYPE engine_journal_records_total counter"
    );
    for l in &j.lanes {
        let _ = writeln!(
            s,
            "engine_journal_records_total{{lane=\"{}\"}} {}",
            l.lane, l.frames
        );
    }
    let _ = writeln!(
        s,
        "# HELP engine_journal_bytes_total Bytes appended per lane.\n# TYPE engine_journal_bytes_total counter"
    );
    for l in &j.lanes {
        let _ = writeln!(
            s,
            "engine_journal_bytes_total{{lane=\"{}\"}} {}",
            l.lane, l.bytes
        );
    }
    let _ = writeln!(
        s,
        "# HELP engine_journal_unsynced_bytes Bytes appended but not synced yet, per lane (0 unless a sync policy syncs).\n# TYPE engine_journal_unsynced_bytes gauge"
    );
    for l in &j.lanes {
        let behind = if l.written.segno() == l.durable.segno() {
            l.written.offset().saturating_sub(l.durable.offset())
        } else {
            l.written.offset()
        };
        let _ = writeln!(
            s,
            "engine_journal_unsynced_bytes{{lane=\"{}\"}} {behind}",
            l.lane
        );
    }
    let _ = writeln!(
        s,
        "# HELP engine_journal_syncs_total Syncs of the journal to disk.\n# TYPE engine_journal_syncs_total counter\nengine_journal_syncs_total {}",
        j.syncs
    );
    let _ = writeln!(
        s,
        "# HELP engine_journal_sync_errors_total Syncs that failed.\n# TYPE engine_journal_sync_errors_total counter\nengine_journal_sync_errors_total {}",
        j.sync_errors
    );
    let _ = writeln!(
        s,
        "# HELP engine_journal_compactions_total Online compactions of full segments.\n# TYPE engine_journal_compactions_total counter\nengine_journal_compactions_total {}",
        j.compactions
    );
    let _ = writeln!(
        s,
        "# HELP engine_journal_sync_seconds_max Longest sync so far.\n# TYPE engine_journal_sync_seconds_max gauge\nengine_journal_sync_seconds_max {:.6}",
        j.max_sync_ns as f64 / 1e9
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(le, count)` of every `engine_stage_latency_seconds_bucket` sample of `recorder`,
    /// in text order.
    fn buckets(text: &str, recorder: &str) -> Vec<(String, u64)> {
        let prefix = format!("engine_stage_latency_seconds_bucket{{recorder=\"{recorder}\",le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| {
                let (le, value) = rest.split_once("\"} ").expect("sample line");
                (le.to_owned(), value.parse().expect("integer count"))
            })
            .collect()
    }

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series}"))
            .parse()
            .expect("number")
    }

    #[test]
    fn metrics_stage_histogram_buckets() {
        let reg = LatencyRegistry::new();
        let mut a = reg.recorder("signing.service");
        let _idle = reg.recorder("policy.service");
        // 3 × 500 ns, 2 × 1 µs (on the bound), 1.5 µs, 40 µs, 3 ms, 20 s (saturates at 10 s).
        for v in [
            500,
            500,
            500,
            1_000,
            1_000,
            1_500,
            40_000,
            3_000_000,
            20_000_000_000,
        ] {
            a.record(v);
        }
        let counters = Counters::default();
        counters.received.store(7, Ordering::Relaxed);
        let text = prometheus(&reg, &counters);

        assert!(text.contains("# TYPE engine_stage_latency_seconds histogram\n"));
        let b = buckets(&text, "signing.service");
        assert_eq!(b.len(), STAGE_BUCKETS_NS.len() + 1);
        let expect = |le: &str| b.iter().find(|(l, _)| l == le).map(|(_, c)| *c);
        assert_eq!(expect("0.000001"), Some(5));
        assert_eq!(expect("0.000002"), Some(6));
        assert_eq!(expect("0.00002"), Some(6));
        assert_eq!(expect("0.00005"), Some(7));
        assert_eq!(expect("0.002"), Some(7));
        assert_eq!(expect("0.005"), Some(8));
        assert_eq!(expect("5"), Some(8));
        assert_eq!(expect("10"), Some(9));
        // Monotone, bounds ascending, ending with +Inf == _count.
        for w in b.windows(2) {
            assert!(w[0].1 <= w[1].1, "{w:?}");
            if w[1].0 != "+Inf" {
                assert!(w[0].0.parse::<f64>().unwrap() < w[1].0.parse::<f64>().unwrap());
            }
        }
        assert_eq!(b.last().unwrap().0, "+Inf");
        let count = sample(
            &text,
            "engine_stage_latency_seconds_count{recorder=\"signing.service\"}",
        );
        assert_eq!(b.last().unwrap().1 as f64, count);
        assert_eq!(count, 9.0);
        let sum = sample(
            &text,
            "engine_stage_latency_seconds_sum{recorder=\"signing.service\"}",
        );
        let exact = (500.0 * 3.0 + 2_000.0 + 1_500.0 + 40_000.0 + 3_000_000.0 + 1e10) / 1e9;
        assert!((sum - exact).abs() < exact * 1e-3, "{sum} vs {exact}");

        // A recorder with nothing recorded still has its series, all zero.
        let idle = buckets(&text, "policy.service");
        assert_eq!(idle.len(), STAGE_BUCKETS_NS.len() + 1);
        assert!(idle.iter().all(|(_, c)| *c == 0));
        assert_eq!(
            sample(
                &text,
                "engine_stage_latency_seconds_count{recorder=\"policy.service\"}"
            ),
            0.0
        );

        // The summary is still there, from the same snapshot.
        assert_eq!(
            sample(
                &text,
                "engine_latency_seconds_count{recorder=\"signing.service\"}"
            ),
            9.0
        );
        assert!(
            text.contains("engine_latency_seconds{recorder=\"signing.service\",quantile=\"0.99\"}")
        );
        assert_eq!(sample(&text, "engine_intents_received_total"), 7.0);

        // A second scrape is cumulative: one more value, one more count.
        a.record(100);
        let again = prometheus(&reg, &counters);
        let b2 = buckets(&again, "signing.service");
        assert_eq!(b2[0].1, 6);
        assert_eq!(b2.last().unwrap().1, 10);
    }

    #[test]
    fn metrics_bucket_labels_match_bounds() {
        for (le, ns) in STAGE_BUCKETS_LE.iter().zip(STAGE_BUCKETS_NS) {
            let secs: f64 = le.parse().unwrap();
            assert!((secs * 1e9 - ns as f64).abs() < 1e-3, "{le} vs {ns}");
        }
        assert!(STAGE_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            *STAGE_BUCKETS_NS.last().unwrap(),
            pipeline::latency::MAX_TRACKABLE_NS
        );
    }

    #[test]
    fn metrics_queue_gauges() {
        let text = queues_prometheus(&[("intake", 3, 1024), ("audit", 0, 65536)]);
        assert!(text.contains("# TYPE engine_queue_depth gauge\n"));
        assert!(text.contains("# TYPE engine_queue_capacity gauge\n"));
        assert!(text.contains("engine_queue_depth{queue=\"intake\"} 3\n"));
        assert!(text.contains("engine_queue_capacity{queue=\"intake\"} 1024\n"));
        assert!(text.contains("engine_queue_depth{queue=\"audit\"} 0\n"));
        assert!(text.contains("engine_queue_capacity{queue=\"audit\"} 65536\n"));
    }
}
