//! The Beacon API client and the validator watcher against the loopback
//! Beacon API node (`BeaconSim`): statuses, balances, alerts, batching,
//! typed errors and recovery.
#![cfg(feature = "testkit")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use venues::beacon::{FAR_FUTURE_EPOCH, MAX_IDS_PER_REQUEST};
use venues::beacon_sim::{BeaconSim, SIM_FAILURE_MESSAGE, SimRoute, block_root, state_root};
use venues::{
    AlertKind, BeaconClient, BlsPubkey, StateId, ValidatorId, ValidatorInfo, ValidatorStatus,
    ValidatorWatch, VenueError, WatchConfig, WatchEvent,
};

use ValidatorStatus::*;

const GWEI_32_ETH: u64 = 32_000_000_000;

fn key(n: u64) -> BlsPubkey {
    let mut k = [0x8a; 48];
    k[40..].copy_from_slice(&n.to_be_bytes());
    k
}

fn credentials(n: u64) -> [u8; 32] {
    let mut c = [0u8; 32];
    c[0] = 0x01;
    c[24..].copy_from_slice(&n.to_be_bytes());
    c
}

fn validator(n: u64, status: ValidatorStatus) -> ValidatorInfo {
    ValidatorInfo {
        index: n,
        pubkey: key(n),
        withdrawal_credentials: credentials(n),
        balance_gwei: GWEI_32_ETH,
        effective_balance_gwei: GWEI_32_ETH,
        status,
        slashed: false,
        activation_eligibility_epoch: 0,
        activation_epoch: if status.is_active() {
            1
        } else {
            FAR_FUTURE_EPOCH
        },
        exit_epoch: FAR_FUTURE_EPOCH,
        withdrawable_epoch: FAR_FUTURE_EPOCH,
    }
}

fn start() -> BeaconSim {
    BeaconSim::start().unwrap()
}

fn watch_on(sim: &BeaconSim, cfg: WatchConfig) -> ValidatorWatch {
    ValidatorWatch::new(BeaconClient::connect(&sim.url()).unwrap(), cfg)
}

fn at_epoch(sim: &BeaconSim, epoch: u64) {
    sim.set_head_slot(epoch * 32 + 5);
}

fn statuses(events: &[WatchEvent]) -> Vec<(BlsPubkey, Option<ValidatorStatus>, ValidatorStatus)> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Status {
                pubkey, from, to, ..
            } => Some((*pubkey, *from, *to)),
            _ => None,
        })
        .collect()
}

fn balances(events: &[WatchEvent]) -> Vec<(BlsPubkey, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Balance {
                pubkey,
                epoch,
                balance_gwei,
            } => Some((*pubkey, *epoch, *balance_gwei)),
            _ => None,
        })
        .collect()
}

fn alerts(events: &[WatchEvent]) -> Vec<(BlsPubkey, AlertKind)> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Alert { pubkey, kind, .. } => Some((*pubkey, *kind)),
            _ => None,
        })
        .collect()
}

fn alert_messages(events: &[WatchEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Alert { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn client_reads_the_head_and_validators() {
    let sim = start();
    sim.set_head_slot(1234);
    let mut v = validator(3, ActiveOngoing);
    v.balance_gwei = 32_001_234_567;
    v.exit_epoch = 900;
    sim.upsert_validator(v.clone());
    sim.upsert_validator(validator(9, PendingQueued));
    let mut c = BeaconClient::connect(&sim.url()).unwrap();

    let head = c.head().unwrap();
    assert_eq!(head.slot, 1234);
    assert_eq!(head.root, block_root(1234));
    assert_eq!(head.state_root, state_root(1234));
    assert!(!head.execution_optimistic && !head.finalized);

    // By pubkey and by index, with an unknown one that is simply absent.
    let got = c
        .validators(
            StateId::Head,
            &[
                ValidatorId::Pubkey(key(3)),
                ValidatorId::Index(9),
                ValidatorId::Pubkey(key(77)),
            ],
        )
        .unwrap();
    assert_eq!(got, vec![v, validator(9, PendingQueued)]);
    assert_eq!(
        c.validators(StateId::Slot(1234), &[ValidatorId::Index(77)])
            .unwrap(),
        vec![]
    );
    // No request for no ids (to the API that would mean "all validators").
    let before = sim.request_count();
    assert_eq!(c.validators(StateId::Head, &[]).unwrap(), vec![]);
    assert_eq!(sim.request_count(), before);
    // A slot after the head is 404 with the node's message.
    match c.validators(StateId::Slot(5000), &[ValidatorId::Index(3)]) {
        Err(VenueError::BeaconHttp {
            status: 404,
            message: Some(m),
            ..
        }) => assert!(m.contains("5000"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Keep-alive: everything above went over one connection, errors included.
    assert_eq!(sim.connection_count(), 1);
}

#[test]
fn first_sight_reports_every_status_once_and_learns_credentials() {
    let sim = start();
    at_epoch(&sim, 10);
    let all = [
        PendingInitialized,
        PendingQueued,
        ActiveOngoing,
        ActiveExiting,
        ExitedUnslashed,
        WithdrawalPossible,
        WithdrawalDone,
    ];
    for (i, s) in all.iter().enumerate() {
        sim.upsert_validator(validator(i as u64, *s));
    }
    let mut w = watch_on(&sim, WatchConfig::default());
    for i in 0..all.len() as u64 {
        assert!(w.watch(key(i)));
    }
    assert!(!w.watch(key(0)), "watching twice is a no-op");
    assert_eq!(
        w.credentials(&key(0)),
        None,
        "nothing learned before a poll"
    );

    let ev = w.poll().unwrap();
    let want: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(i, s)| (key(i as u64), None, *s))
        .collect();
    assert_eq!(statuses(&ev), want);
    assert_eq!(ev.len(), all.len(), "first sight is only Status: {ev:?}");
    match &ev[2] {
        WatchEvent::Status {
            index,
            balance_gwei,
            slashed,
            ..
        } => assert_eq!(
            (*index, *balance_gwei, *slashed),
            (Some(2), GWEI_32_ETH, false)
        ),
        other => panic!("{other:?}"),
    }
    for i in 0..all.len() as u64 {
        assert_eq!(w.credentials(&key(i)), Some(credentials(i)));
    }
    assert_eq!(w.validator(&key(4)).unwrap().status, ExitedUnslashed);
    assert_eq!(w.epoch(), Some(10));

    // Nothing changed: nothing to report, same epoch or not.
    assert_eq!(w.poll().unwrap(), vec![]);
    at_epoch(&sim, 11);
    assert_eq!(w.poll().unwrap(), vec![]);

    assert!(w.unwatch(&key(0)));
    assert!(!w.unwatch(&key(0)));
    assert_eq!(w.credentials(&key(0)), None);
    assert_eq!(sim.connection_count(), 1);
}

#[test]
fn status_changes_and_unexpected_exits() {
    let sim = start();
    at_epoch(&sim, 1);
    let (planned, surprise) = (key(1), key(2));
    sim.upsert_validator(validator(1, PendingQueued));
    sim.upsert_validator(validator(2, PendingQueued));
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(planned);
    w.watch(surprise);
    assert!(w.expect_exit(&planned));
    assert!(!w.expect_exit(&key(99)), "not watched");
    assert_eq!(statuses(&w.poll().unwrap()).len(), 2);

    let step = |w: &mut ValidatorWatch, to: ValidatorStatus| {
        sim.set_status(&planned, to);
        sim.set_status(&surprise, to);
        w.poll().unwrap()
    };

    let ev = step(&mut w, ActiveOngoing);
    assert_eq!(
        statuses(&ev),
        vec![
            (planned, Some(PendingQueued), ActiveOngoing),
            (surprise, Some(PendingQueued), ActiveOngoing)
        ]
    );
    assert_eq!(alerts(&ev), vec![]);

    let ev = step(&mut w, ActiveExiting);
    assert_eq!(
        statuses(&ev),
        vec![
            (planned, Some(ActiveOngoing), ActiveExiting),
            (surprise, Some(ActiveOngoing), ActiveExiting)
        ]
    );
    assert_eq!(alerts(&ev), vec![(surprise, AlertKind::UnexpectedExit)]);
    let msg = &alert_messages(&ev)[0];
    assert!(
        msg.contains("validator 2") && msg.contains("active_ongoing to active_exiting"),
        "{msg}"
    );

    // Further exit steps are status changes, not new alerts.
    let ev = step(&mut w, ExitedUnslashed);
    assert_eq!(
        statuses(&ev),
        vec![
            (planned, Some(ActiveExiting), ExitedUnslashed),
            (surprise, Some(ActiveExiting), ExitedUnslashed)
        ]
    );
    assert_eq!(alerts(&ev), vec![]);
    assert_eq!(w.poll().unwrap(), vec![]);

    // Skipping straight from active to exited is an unexpected exit too.
    let sudden = key(3);
    sim.upsert_validator(validator(3, ActiveOngoing));
    w.watch(sudden);
    w.poll().unwrap();
    sim.set_status(&sudden, ExitedUnslashed);
    let ev = w.poll().unwrap();
    assert_eq!(alerts(&ev), vec![(sudden, AlertKind::UnexpectedExit)]);
}

#[test]
fn a_slashing_alerts_once() {
    let sim = start();
    at_epoch(&sim, 4);
    for i in 0..2 {
        sim.upsert_validator(validator(i, ActiveOngoing));
    }
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(key(0));
    w.watch(key(1));
    w.poll().unwrap();

    assert!(sim.slash(&key(1)));
    let ev = w.poll().unwrap();
    assert_eq!(
        statuses(&ev),
        vec![(key(1), Some(ActiveOngoing), ActiveSlashed)]
    );
    // A slashing exit is the slashing alert, not an unexpected exit.
    assert_eq!(alerts(&ev), vec![(key(1), AlertKind::Slashed)]);
    assert!(alert_messages(&ev)[0].contains("slashed"));
    match &ev[0] {
        WatchEvent::Status { slashed, .. } => assert!(*slashed),
        other => panic!("{other:?}"),
    }

    assert_eq!(alerts(&w.poll().unwrap()), vec![]);
    sim.set_status(&key(1), ExitedSlashed);
    let ev = w.poll().unwrap();
    assert_eq!(
        statuses(&ev),
        vec![(key(1), Some(ActiveSlashed), ExitedSlashed)]
    );
    assert_eq!(alerts(&ev), vec![], "still the same slashing");

    // A validator already slashed when first seen is alerted on first sight.
    let mut v = validator(5, ExitedSlashed);
    v.slashed = true;
    sim.upsert_validator(v);
    w.watch(key(5));
    let ev = w.poll().unwrap();
    assert_eq!(alerts(&ev), vec![(key(5), AlertKind::Slashed)]);
    assert_eq!(alerts(&w.poll().unwrap()), vec![]);
}

#[test]
fn balances_once_per_epoch_and_falling_streaks_alert_once() {
    let sim = start();
    let v = key(7);
    sim.upsert_validator(validator(7, ActiveOngoing));
    at_epoch(&sim, 100);
    let mut w = watch_on(
        &sim,
        WatchConfig {
            slots_per_epoch: 32,
            falling_epochs: 3,
        },
    );
    w.watch(v);
    w.poll().unwrap();

    // Within an epoch the balance is not looked at again.
    sim.set_balance(&v, GWEI_32_ETH + 10);
    assert_eq!(w.poll().unwrap(), vec![]);

    let mut balance = GWEI_32_ETH + 10;
    let mut epoch = 100;
    let mut next = |w: &mut ValidatorWatch, delta: i64| {
        epoch += 1;
        balance = balance.checked_add_signed(delta).unwrap();
        sim.set_balance(&v, balance);
        at_epoch(&sim, epoch);
        let ev = w.poll().unwrap();
        // A second poll in the same epoch adds nothing.
        assert_eq!(w.poll().unwrap(), vec![]);
        (epoch, balance, ev)
    };

    // Rising: a Balance event, no alert.
    let (e, b, ev) = next(&mut w, 0);
    assert_eq!(balances(&ev), vec![(v, e, b)]);
    let (e, b, ev) = next(&mut w, 5);
    assert_eq!(balances(&ev), vec![(v, e, b)]);
    // Unchanged: nothing at all.
    let (_, _, ev) = next(&mut w, 0);
    assert_eq!(ev, vec![]);

    // Three falls in a row: the alert comes with the third, once.
    for _ in 0..2 {
        let (e, b, ev) = next(&mut w, -3);
        assert_eq!(balances(&ev), vec![(v, e, b)]);
        assert_eq!(alerts(&ev), vec![]);
    }
    let (_, b, ev) = next(&mut w, -3);
    assert_eq!(
        alerts(&ev),
        vec![(v, AlertKind::BalanceFalling { epochs: 3 })]
    );
    let msg = &alert_messages(&ev)[0];
    assert!(msg.contains(&format!("to {b} gwei")), "{msg}");
    assert!(msg.contains(&format!("from {}", b + 9)), "{msg}");
    // The streak goes on: no new alert.
    for _ in 0..2 {
        let (_, _, ev) = next(&mut w, -1);
        assert_eq!(alerts(&ev), vec![]);
        assert_eq!(balances(&ev).len(), 1);
    }
    // It recovers: the streak ends, no alert.
    let (_, _, ev) = next(&mut w, 2);
    assert_eq!(alerts(&ev), vec![]);
    // Two falls are not enough ...
    for _ in 0..2 {
        assert_eq!(alerts(&next(&mut w, -1).2), vec![]);
    }
    // ... a flat epoch ends that streak too ...
    assert_eq!(next(&mut w, 0).2, vec![]);
    for _ in 0..2 {
        assert_eq!(alerts(&next(&mut w, -1).2), vec![]);
    }
    // ... and a new streak of three alerts again.
    assert_eq!(
        alerts(&next(&mut w, -1).2),
        vec![(v, AlertKind::BalanceFalling { epochs: 3 })]
    );
}

#[test]
fn slots_per_epoch_is_configurable() {
    let sim = start();
    let v = key(1);
    sim.upsert_validator(validator(1, ActiveOngoing));
    sim.set_head_slot(8);
    let mut w = watch_on(
        &sim,
        WatchConfig {
            slots_per_epoch: 8,
            falling_epochs: 0,
        },
    );
    w.watch(v);
    w.poll().unwrap();
    assert_eq!(w.epoch(), Some(1));
    sim.set_balance(&v, 1);
    sim.set_head_slot(15);
    assert_eq!(w.poll().unwrap(), vec![], "slot 15 is still epoch 1");
    sim.set_head_slot(16);
    assert_eq!(balances(&w.poll().unwrap()), vec![(v, 2, 1)]);
    // falling_epochs 0: never an alert, however long the fall.
    for slot in [24, 32, 40, 48] {
        sim.set_balance(&v, 0);
        sim.set_head_slot(slot);
        assert_eq!(alerts(&w.poll().unwrap()), vec![]);
    }
}

#[test]
fn an_unknown_validator_is_reported_once_then_when_it_appears() {
    let sim = start();
    at_epoch(&sim, 3);
    let fresh = key(40);
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(fresh);

    let ev = w.poll().unwrap();
    assert_eq!(
        ev,
        vec![WatchEvent::Status {
            pubkey: fresh,
            index: None,
            from: None,
            to: NotFound,
            balance_gwei: 0,
            slashed: false,
        }]
    );
    assert_eq!(w.credentials(&fresh), None);
    for epoch in 4..7 {
        at_epoch(&sim, epoch);
        assert_eq!(w.poll().unwrap(), vec![]);
    }

    sim.upsert_validator(validator(40, PendingInitialized));
    let ev = w.poll().unwrap();
    assert_eq!(
        statuses(&ev),
        vec![(fresh, Some(NotFound), PendingInitialized)]
    );
    assert_eq!(alerts(&ev), vec![]);
    assert_eq!(w.credentials(&fresh), Some(credentials(40)));
    assert_eq!(w.poll().unwrap(), vec![]);
}

#[test]
fn a_server_error_is_typed_and_the_watch_recovers() {
    let sim = start();
    at_epoch(&sim, 1);
    sim.upsert_validator(validator(1, ActiveOngoing));
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(key(1));
    w.poll().unwrap();

    sim.set_fail(Some(500));
    let err = w.poll().unwrap_err();
    match &err {
        VenueError::BeaconHttp {
            endpoint,
            status,
            message,
        } => {
            assert_eq!(*endpoint, "/eth/v1/beacon/headers/head");
            assert_eq!(*status, 500);
            assert_eq!(message.as_deref(), Some(SIM_FAILURE_MESSAGE));
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("500") && text.contains(SIM_FAILURE_MESSAGE),
        "{text}"
    );

    // What changes while the node fails is reported by the first good poll.
    sim.set_status(&key(1), ActiveExiting);
    at_epoch(&sim, 2);
    sim.set_balance(&key(1), GWEI_32_ETH - 1);
    assert!(matches!(
        w.poll(),
        Err(VenueError::BeaconHttp { status: 500, .. })
    ));
    sim.set_fail(Some(503));
    assert!(matches!(
        w.poll(),
        Err(VenueError::BeaconHttp { status: 503, .. })
    ));
    sim.set_fail(None);
    let ev = w.poll().unwrap();
    assert_eq!(
        statuses(&ev),
        vec![(key(1), Some(ActiveOngoing), ActiveExiting)]
    );
    assert_eq!(balances(&ev), vec![(key(1), 2, GWEI_32_ETH - 1)]);
    assert_eq!(alerts(&ev), vec![(key(1), AlertKind::UnexpectedExit)]);
    assert_eq!(w.poll().unwrap(), vec![]);
    // HTTP errors do not cost the connection.
    assert_eq!(sim.connection_count(), 1);
}

#[test]
fn malformed_replies_are_typed_errors() {
    let sim = start();
    at_epoch(&sim, 1);
    sim.upsert_validator(validator(1, ActiveOngoing));
    let mut c = BeaconClient::connect(&sim.url()).unwrap();

    let good = {
        let mut s = TcpStream::connect(sim.addr()).unwrap();
        s.write_all(
            format!(
                "GET /eth/v1/beacon/states/head/validators?id={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                ValidatorId::Pubkey(key(1))
            )
            .as_bytes(),
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let body = reply.split_once("\r\n\r\n").unwrap().1.to_owned();
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let with = |path: &[&str], v: Value| {
        let mut doc = good.clone();
        let mut at = &mut doc["data"][0];
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = v;
        doc.to_string()
    };

    let head_cases = [
        "not json".to_owned(),
        "{}".to_owned(),
        r#"{"data":{"root":"0x12","header":{"message":{"slot":"1","state_root":"0x00"}}}}"#
            .to_owned(),
        r#"{"data":{"root":"0x1200000000000000000000000000000000000000000000000000000000000000","header":{"message":{"slot":"-1"}}}}"#
            .to_owned(),
    ];
    for body in head_cases {
        sim.set_raw_body(SimRoute::Head, Some(body.clone()));
        match c.head() {
            Err(VenueError::BeaconDecode { endpoint, detail }) => {
                assert_eq!(endpoint, "/eth/v1/beacon/headers/head");
                assert!(!detail.is_empty());
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    sim.set_raw_body(SimRoute::Head, None);

    let ids = [ValidatorId::Pubkey(key(1))];
    let validator_cases = [
        ("truncated", good.to_string()[..40].to_owned(), "EOF"),
        (
            "data is not a list",
            r#"{"data":{}}"#.to_owned(),
            "sequence",
        ),
        ("balance", with(&["balance"], "32 ETH".into()), "32 ETH"),
        (
            "balance as a negative number",
            with(&["balance"], (-1).into()),
            "-1",
        ),
        (
            "status",
            with(&["status"], "active_sleeping".into()),
            "active_sleeping",
        ),
        (
            "short pubkey",
            with(&["validator", "pubkey"], "0xabcd".into()),
            "96 hex digits",
        ),
        (
            "credentials without 0x",
            with(
                &["validator", "withdrawal_credentials"],
                "01".repeat(32).into(),
            ),
            "64 hex digits",
        ),
        (
            "slashed as a string",
            with(&["validator", "slashed"], "false".into()),
            "boolean",
        ),
        (
            "exit epoch beyond 64 bits",
            with(&["validator", "exit_epoch"], "18446744073709551616".into()),
            "18446744073709551616",
        ),
    ];
    for (what, body, needle) in validator_cases {
        sim.set_raw_body(SimRoute::Validators, Some(body));
        match c.validators(StateId::Head, &ids) {
            Err(e @ VenueError::BeaconDecode { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("/eth/v1/beacon/states/{state_id}/validators")
                        && text.contains(needle),
                    "{what}: {text}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    sim.set_raw_body(SimRoute::Validators, None);

    // The connection stayed in step through all of it.
    assert_eq!(c.validators(StateId::Head, &ids).unwrap().len(), 1);
    assert_eq!(sim.connection_count(), 2, "ours and the raw one above");

    // A watch fails on a malformed reply and recovers after it.
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(key(1));
    sim.set_raw_body(SimRoute::Validators, Some("[".to_owned()));
    assert!(matches!(w.poll(), Err(VenueError::BeaconDecode { .. })));
    sim.set_raw_body(SimRoute::Validators, None);
    assert_eq!(
        statuses(&w.poll().unwrap()),
        vec![(key(1), None, ActiveOngoing)]
    );
}

#[test]
fn more_keys_than_one_batch_take_several_requests() {
    let sim = start();
    at_epoch(&sim, 2);
    let n = 2 * MAX_IDS_PER_REQUEST as u64 + 10;
    // Every third one is not on the beacon chain yet.
    for i in (0..n).filter(|i| i % 3 != 0) {
        sim.upsert_validator(validator(i, ActiveOngoing));
    }
    let mut w = watch_on(&sim, WatchConfig::default());
    for i in 0..n {
        w.watch(key(i));
    }
    let before = sim.request_count();
    let ev = w.poll().unwrap();
    assert_eq!(
        sim.request_count() - before,
        1 + 3,
        "the head and 3 batches"
    );
    let st = statuses(&ev);
    assert_eq!(st.len() as u64, n);
    for (pubkey, from, to) in st {
        let i = u64::from_be_bytes(pubkey[40..].try_into().unwrap());
        assert_eq!(from, None);
        assert_eq!(to, if i % 3 == 0 { NotFound } else { ActiveOngoing });
    }

    // A smaller batch size means more requests.
    w.client_mut().set_batch_size(10);
    let before = sim.request_count();
    assert_eq!(w.poll().unwrap(), vec![]);
    assert_eq!(sim.request_count() - before, 1 + n.div_ceil(10));
    assert_eq!(sim.connection_count(), 1);
}

#[test]
fn reconnects_after_the_node_closes_the_connection() {
    let sim = start();
    at_epoch(&sim, 1);
    sim.upsert_validator(validator(1, ActiveOngoing));
    let mut w = watch_on(&sim, WatchConfig::default());
    w.watch(key(1));
    w.poll().unwrap();
    assert_eq!(sim.connection_count(), 1);

    // An idle keep-alive connection closed by the node: the next poll
    // re-sends on a fresh connection without surfacing an error.
    sim.disconnect_all();
    sim.set_status(&key(1), ActiveExiting);
    assert!(w.expect_exit(&key(1)));
    let ev = w.poll().unwrap();
    assert_eq!(
        statuses(&ev),
        vec![(key(1), Some(ActiveOngoing), ActiveExiting)]
    );
    assert_eq!(alerts(&ev), vec![]);
    assert_eq!(sim.connection_count(), 2);
}

#[test]
fn a_stalled_node_times_out_and_the_next_poll_recovers() {
    let sim = start();
    at_epoch(&sim, 1);
    sim.upsert_validator(validator(1, ActiveOngoing));
    let mut c = BeaconClient::connect_with_timeout(&sim.url(), Duration::from_millis(300)).unwrap();
    assert_eq!(c.timeout(), Duration::from_millis(300));
    c.head().unwrap();
    let mut w = ValidatorWatch::new(c, WatchConfig::default());
    w.watch(key(1));

    sim.set_stall(true);
    let t0 = Instant::now();
    let err = w.poll().unwrap_err();
    assert!(matches!(err, VenueError::Timeout(_)), "{err:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(
        !w.client_mut().is_connected(),
        "a timed-out connection is dropped"
    );

    sim.set_stall(false);
    let ev = w.poll().unwrap();
    assert_eq!(statuses(&ev), vec![(key(1), None, ActiveOngoing)]);
    assert!(w.client_mut().is_connected());
    assert_eq!(sim.connection_count(), 2);
}

#[test]
fn unknown_routes_are_404_with_the_standard_body() {
    let sim = start();
    // A base path the node does not serve: every route is 404.
    let mut c = BeaconClient::connect(&format!("{}/not-a-prefix/", sim.url())).unwrap();
    match c.head() {
        Err(VenueError::BeaconHttp {
            status: 404,
            message: Some(m),
            ..
        }) => assert!(
            m.contains("/not-a-prefix/eth/v1/beacon/headers/head"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }

    let mut s = TcpStream::connect(sim.addr()).unwrap();
    s.write_all(b"GET /eth/v1/node/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404 "), "{reply}");
    let body: Value = serde_json::from_str(reply.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["code"], 404);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("/eth/v1/node/version")
    );

    // Any well-formed state id reads the one state; a slot after the head is 404.
    let mut c = BeaconClient::connect(&sim.url()).unwrap();
    let root = StateId::Root(alloy_primitives::B256::repeat_byte(7));
    assert_eq!(
        c.validators(root, &[ValidatorId::Index(1)]).unwrap(),
        vec![]
    );
    assert!(matches!(
        c.validators(StateId::Slot(1), &[ValidatorId::Index(1)]),
        Err(VenueError::BeaconHttp { status: 404, .. })
    ));
    for url in [
        "https://127.0.0.1:1",
        "http://127.0.0.1:1/?x=1",
        "127.0.0.1:1",
    ] {
        assert!(
            matches!(
                BeaconClient::connect(url),
                Err(VenueError::InvalidBeaconUrl(_))
            ),
            "{url}"
        );
    }
}
