//! A real moto KMS server on a free loopback port, for the KMS signer's tests.
//!
//! Started with the project-local virtualenv (`.tools/venv`, made by
//! `scripts/setup.d/30-moto.sh`) running `scripts/moto_kms_server.py`, which patches moto 5.2.5
//! so that `Sign` / `Verify` with `MessageType=DIGEST` use the message as the prehash, as real
//! AWS KMS does (unpatched moto hashes the digest again; upstream pull request 10202 is open).
//! Without that correction a signer that is right for AWS would fail here, and one that is
//! wrong for AWS would pass. Killed and reaped on drop.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use signers::kms::{KmsConfig, KmsCredentials};

/// Region the tests use (moto keeps one backend per region).
pub const REGION: &str = "us-east-1";

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("signers/ has a parent")
        .to_path_buf()
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    /// Starts the server (with the DIGEST correction) and waits until it accepts connections.
    pub fn spawn() -> Moto {
        Self::spawn_with(&[])
    }

    /// Starts moto as released, WITHOUT the DIGEST correction: only for the test that shows
    /// the correction matters.
    pub fn spawn_unpatched() -> Moto {
        Self::spawn_with(&["--unpatched"])
    }

    fn spawn_with(extra: &[&str]) -> Moto {
        let root = root();
        let python = root.join(".tools/venv/bin/python");
        let script = root.join("scripts/moto_kms_server.py");
        assert!(
            python.exists(),
            "moto is not installed: {} is missing; run scripts/setup.sh \
             (scripts/setup.d/30-moto.sh creates .tools/venv with moto[server]==5.2.5)",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(&python)
            .arg(&script)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
        let mut moto = Moto {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return moto;
            }
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!(
                    "moto_kms_server.py exited ({status}) before listening:\n{}",
                    moto.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen on port {port} within 30 s:\n{}",
                moto.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A signer configuration for `key_id` on this server, with throwaway credentials.
    pub fn config(&self, key_id: &str) -> KmsConfig {
        KmsConfig {
            endpoint_url: Some(self.endpoint()),
            credentials: Some(KmsCredentials {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
            }),
            ..KmsConfig::new(REGION, key_id)
        }
    }

    /// What the server printed (its request log and any traceback).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
