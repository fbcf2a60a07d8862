//! The dev chain process: locating, spawning, supervising, killing.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use alloy_primitives::U256;
use alloy_signer_local::PrivateKeySigner;
use common::spawn_anvil;
use venues::anvil::{ANVIL_VERSION, anvil_version};
use venues::{
    Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS, VenueError, dev_address, locate_anvil,
};

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn locates_spawns_and_answers_chain_id() {
    let bin = locate_anvil(None).expect("anvil is installed by scripts/setup.sh");
    let version = anvil_version(&bin).unwrap();
    assert!(
        version.contains(ANVIL_VERSION),
        "{} is {version:?}",
        bin.display()
    );

    let a = spawn_anvil(&AnvilConfig::default());
    let b = spawn_anvil(&AnvilConfig::default());
    assert_ne!(a.port(), 0);
    assert_ne!(a.port(), b.port(), "each anvil gets its own port");
    assert_eq!(a.ws_url(), format!("ws://127.0.0.1:{}", a.port()));
    assert_eq!(a.http_url(), format!("http://127.0.0.1:{}", a.port()));
    assert_eq!(a.binary(), bin.as_path());
    assert!(pid_alive(a.pid()));
    assert_eq!(a.chain_id(), 31337);
    assert_eq!(a.rpc().unwrap().chain_id().unwrap(), 31337);
    assert_eq!(b.rpc().unwrap().chain_id().unwrap(), 31337);
}

#[test]
fn config_reaches_the_process() {
    let cfg = AnvilConfig {
        chain_id: Some(4242),
        accounts: Some(3),
        ..AnvilConfig::default()
    };
    let mut anvil = spawn_anvil(&cfg);
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(rpc.chain_id().unwrap(), 4242);
    assert_eq!(anvil.chain_id(), 4242);
    assert!(rpc.balance(dev_address(2)).unwrap() > U256::ZERO);
    assert_eq!(
        rpc.balance(dev_address(3)).unwrap(),
        U256::ZERO,
        "only 3 accounts funded"
    );
    assert_eq!(anvil.exited(), None);
}

#[test]
fn drop_kills_and_reaps_the_process() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let pid = anvil.pid();
    let port = anvil.port();
    assert!(pid_alive(pid));
    drop(anvil);
    assert!(!pid_alive(pid), "anvil pid {pid} still exists after drop");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
}

#[test]
fn exited_reports_a_crash_and_kill_is_idempotent() {
    let mut anvil = spawn_anvil(&AnvilConfig::default());
    assert_eq!(anvil.exited(), None);
    let status = std::process::Command::new("kill")
        .args(["-9", &anvil.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        if let Some(r) = anvil.exited() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "exit of a killed anvil not observed within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(reason.contains("9") || reason.contains("KILL"), "{reason}");
    anvil.kill();
    anvil.kill();
    assert_eq!(anvil.exited(), Some(reason));
}

#[test]
fn bad_explicit_path_is_named_in_the_error() {
    let bad = Path::new("/nonexistent/dir/anvil");
    match locate_anvil(Some(bad)) {
        Err(e @ VenueError::AnvilNotFound { .. }) => {
            let VenueError::AnvilNotFound { searched } = &e else {
                unreachable!()
            };
            assert_eq!(searched.as_slice(), [bad.to_path_buf()]);
            assert!(e.to_string().contains("/nonexistent/dir/anvil"), "{e}");
        }
        other => panic!("expected AnvilNotFound, got {other:?}"),
    }
    let cfg = AnvilConfig {
        binary: Some(bad.to_path_buf()),
        ..AnvilConfig::default()
    };
    let err = Anvil::spawn(&cfg).unwrap_err();
    assert!(matches!(err, VenueError::AnvilNotFound { .. }), "{err:?}");
}

#[test]
fn a_bad_argument_reports_the_exit_and_anvils_output() {
    let cfg = AnvilConfig {
        extra_args: vec!["--no-such-flag".to_owned()],
        ..AnvilConfig::default()
    };
    match Anvil::spawn(&cfg) {
        Err(VenueError::AnvilExited { status, output }) => {
            assert!(!status.contains("running"), "{status}");
            assert!(output.contains("no-such-flag"), "output was: {output}");
        }
        other => panic!("expected AnvilExited, got {other:?}"),
    }
}

#[test]
fn dev_keys_match_dev_addresses() {
    for (i, key) in DEV_PRIVATE_KEYS.iter().enumerate() {
        assert!(key.starts_with("0x") && key.len() == 66);
        let signer = PrivateKeySigner::from_str(key).unwrap();
        assert_eq!(signer.address(), DEV_ADDRESSES[i], "dev key {i}");
    }
}
