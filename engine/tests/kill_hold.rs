//! The kill switch at the broadcast stage: transactions signed before the switch but not
//! yet written to the node are held, unsent (checked on the node), and go out in nonce
//! order when it is turned off. The broadcast stage against a real anvil.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{TxKind, U256};
use engine::blob::BlobPool;
use engine::msg::{AccountIdx, Origin, State, StatusKind, StatusMsg, TxMsg};
use engine::risk::kill::{KillScope, KillSwitch};
use engine::stages::StatusSink;
use engine::stages::broadcast::{
    BroadcastRecorders, BroadcastStage, BroadcastStats, BroadcastTuning, ProviderSpec,
};
use pipeline::{Emit, LatencyRegistry, Stage, many_to_one};
use signers::{LocalCurve, LocalSigner, Signer};
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS, RpcClient};

struct Sink(Vec<TxMsg>);
impl Emit<TxMsg> for Sink {
    fn emit(&mut self, m: TxMsg) {
        self.0.push(m);
    }
}

#[test]
fn signed_transactions_are_held_while_killed_and_sent_in_order_after() {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(200)))
        .expect("anvil starts (run scripts/setup.sh)");
    let mut rpc = RpcClient::connect(&anvil.ws_url()).unwrap();
    let chain_id = rpc.chain_id().unwrap();
    let blobs = Arc::new(BlobPool::new(64));
    let (status_tx, mut status_rx) = many_to_one::<StatusMsg>(256);
    let status = StatusSink::new(status_tx, Arc::new(AtomicBool::new(false)));
    let kill = Arc::new(KillSwitch::new(2));
    let venue = kill.venue_slot("anvil").unwrap();
    let reg = LatencyRegistry::new();
    let mut stage = BroadcastStage::connect(
        &[ProviderSpec {
            name: "anvil".into(),
            ws_url: anvil.ws_url(),
            venue,
        }],
        BroadcastTuning::default(),
        Arc::clone(&blobs),
        status,
        BroadcastRecorders {
            ws_to_wire: reg.recorder("a"),
            ws_to_node: reg.recorder("b"),
            node_rtt: reg.recorder("c"),
            socket_write: reg.recorder("d"),
        },
        64,
        Arc::clone(&kill),
        Arc::new(BroadcastStats::new(&["anvil".to_owned()])),
    )
    .unwrap();
    let fee = rpc.fee_estimate().unwrap();
    let tx = |acct: usize, nonce: u64, seq: u64| {
        let signer =
            LocalSigner::from_hex("k", DEV_PRIVATE_KEYS[acct], LocalCurve::Secp256k1).unwrap();
        let t = TxEip1559 {
            chain_id,
            nonce,
            gas_limit: 21_000,
            max_fee_per_gas: fee.base_fee_per_gas * 2 + fee.max_priority_fee_per_gas,
            max_priority_fee_per_gas: fee.max_priority_fee_per_gas,
            to: TxKind::Call(DEV_ADDRESSES[5]),
            value: U256::from(1),
            ..TxEip1559::default()
        };
        let sig = signer.sign_hash(&t.signature_hash()).unwrap();
        let env: TxEnvelope = t.into_signed(sig).into();
        TxMsg {
            seq,
            origin: Origin {
                conn: 1,
                principal: 1,
            },
            account: AccountIdx(acct as u16),
            nonce,
            tx_hash: *env.tx_hash(),
            raw: blobs.claim_with(&env.encoded_2718()).unwrap(),
            ..TxMsg::default()
        }
    };
    let mut out = Sink(Vec::new());
    let pump = |stage: &mut BroadcastStage,
                out: &mut Sink,
                until: &dyn Fn(&[StatusMsg]) -> bool,
                seen: &mut Vec<StatusMsg>,
                status_rx: &mut pipeline::ManyToOneConsumer<StatusMsg>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !until(seen) {
            assert!(Instant::now() < deadline, "timed out; seen {seen:?}");
            stage.poll_extra(out);
            while let Some(m) = status_rx.pop() {
                seen.push(m);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let broadcast = |seen: &[StatusMsg], seq: u64| {
        seen.iter()
            .any(|m| m.kind == StatusKind::Event && m.state == State::Broadcast && m.seq == seq)
    };
    let mut seen = Vec::new();

    // Account 0 is killed; three of its transactions arrive signed. Account 1 is not.
    kill.set(&KillScope::Account(0), true).unwrap();
    for n in 0..3 {
        stage.on_message(tx(0, n, 10 + n), &mut out);
    }
    stage.on_message(tx(1, 0, 20), &mut out);
    assert_eq!(stage.held(), 3);
    pump(
        &mut stage,
        &mut out,
        &|s| broadcast(s, 20),
        &mut seen,
        &mut status_rx,
    );
    std::thread::sleep(Duration::from_millis(500)); // two blocks
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "pending").unwrap(),
        0,
        "nothing reached the node"
    );
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[1], "pending").unwrap(),
        1,
        "other accounts go on"
    );
    assert!(
        !seen.iter().any(|m| (10..13).contains(&m.seq)),
        "no event for held ones: {seen:?}"
    );

    // Turned off: they go out, in nonce order, and the node takes all three.
    kill.set(&KillScope::Account(0), false).unwrap();
    pump(
        &mut stage,
        &mut out,
        &|s| (10..13).all(|q| broadcast(s, q)),
        &mut seen,
        &mut status_rx,
    );
    assert_eq!(stage.held(), 0);
    // The node may answer a batch in any order; the order they were written in is each
    // hand-off's second hop stamp (taken as the request was written).
    let mut sent: Vec<(u64, u64)> = out
        .0
        .iter()
        .filter(|m| m.account.0 == 0)
        .map(|m| (m.hops.get(1).expect("sent stamp"), m.nonce))
        .collect();
    sent.sort();
    let order: Vec<u64> = sent.iter().map(|&(_, n)| n).collect();
    assert_eq!(order, vec![0, 1, 2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap() < 3 {
        assert!(Instant::now() < deadline, "mined");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Accepted transactions hand their raw slot on to the receipt watcher, which releases
    // it; here the test plays that part.
    for m in &out.0 {
        assert!(m.raw.is_some(), "the raw slot goes on with the hash");
        blobs.release(m.raw);
    }
    assert_eq!(
        blobs.available(),
        blobs.capacity(),
        "every raw-transaction slot returned"
    );
}
