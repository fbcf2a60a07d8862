//! A real SoftHSM2 token store in a temporary directory, for the HSM signer's tests and bench.
//!
//! SoftHSM reads its configuration file from `SOFTHSM2_CONF` once, in `C_Initialize`, and the
//! PKCS#11 state (initialised library, sessions, login) is per process. So every test runs in
//! its own child process ([`isolated`]): the parent creates a temporary directory with a
//! `softhsm2.conf` (`directories.tokendir = <tmp>/tokens`, `objectstore.backend = file`) and
//! re-executes the test binary, filtered to that one test, with `SOFTHSM2_CONF` pointing at it.
//! The child then initialises a fresh token through PKCS#11 ([`Token::init`]: `C_InitToken` on
//! a free slot with the SO PIN, `C_InitPIN` for the user PIN) and finds it again by label.
//! No environment variable is ever changed inside a running process, and tests that finalise
//! the library or delete the token store cannot disturb each other.
//!
//! The module is Debian's `softhsm2` (`scripts/setup.d/20-softhsm.sh` installs it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use signers::hsm::cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use signers::hsm::cryptoki::error::{Error as CkError, RvError};
use signers::hsm::cryptoki::session::{Session, UserType};
use signers::hsm::{AuthPin, HsmConfig, SOFTHSM2_MODULE};

/// Security officer PIN of test tokens.
pub const SO_PIN: &str = "so-pin-48151623";
/// User PIN of test tokens (a throwaway test value).
pub const USER_PIN: &str = "user-pin-9274";
/// Label of the token [`Token::init`] creates by default.
pub const TOKEN_LABEL: &str = "signers-test";
/// Environment variable SoftHSM reads its configuration path from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";
/// Set in a child process: the name of the test it runs.
pub const CHILD_ENV: &str = "SIGNERS_HSM_CHILD";
/// Set in a child process: the temporary directory holding `softhsm2.conf` and `tokens/`.
pub const STORE_ENV: &str = "SIGNERS_HSM_STORE";

/// The SoftHSM2 module, or a panic saying how to install it.
pub fn module_path() -> PathBuf {
    let p = PathBuf::from(SOFTHSM2_MODULE);
    assert!(
        p.is_file(),
        "SoftHSM2 module {SOFTHSM2_MODULE} is missing: run scripts/setup.sh \
         (scripts/setup.d/20-softhsm.sh installs the Debian package softhsm2)"
    );
    p
}

/// Writes `softhsm2.conf` and an empty `tokens/` folder into `dir`; returns the config path.
pub fn write_store(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .unwrap();
    conf
}

/// Runs `body` in a child process of its own with a fresh SoftHSM2 token store.
///
/// In the parent: makes the store, re-executes this test binary filtered to `name` (exactly)
/// with `SOFTHSM2_CONF` set, and fails with the child's output unless that one test passed.
/// In the child (`SIGNERS_HSM_CHILD == name`): runs `body`.
pub fn isolated(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        assert!(
            std::env::var_os(CONF_ENV).is_some(),
            "{CONF_ENV} must be set in the child"
        );
        body();
        return;
    }
    module_path();
    let dir = tempfile::tempdir().unwrap();
    let conf = write_store(dir.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env(CONF_ENV, &conf)
        .env(STORE_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child stdout ---\n{stdout}\n--- child stderr ---\n{stderr}");
    assert!(
        out.status.success() && stdout.contains(&format!("test {name} ... ok")),
        "test `{name}` failed in its SoftHSM child process ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// The token store of this (child) process.
pub fn store_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(STORE_ENV).expect("only inside an isolated child"))
}

/// Loads the module and initialises the library (tolerating an already initialised one).
pub fn load() -> Pkcs11 {
    let ctx = Pkcs11::new(module_path()).unwrap();
    initialize(&ctx).unwrap();
    ctx
}

/// `C_Initialize`, where "already initialised" counts as success.
pub fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Logs the user in on `session`; already logged in (login state is per token and process,
/// so a live signer's login counts) is fine.
pub fn login_user(session: &Session) {
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("user login failed: {e}"),
    }
}

/// A token initialised by this process, reached through its own module handle.
pub struct Token {
    /// A handle on the module, separate from every signer's.
    pub ctx: Pkcs11,
    /// The token's label.
    pub label: String,
}

impl Token {
    /// Initialises a new token labelled `label` on a free slot, with [`SO_PIN`] and
    /// [`USER_PIN`]. Must run in an [`isolated`] child.
    pub fn init(label: &str) -> Token {
        let ctx = load();
        let free = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| !ctx.get_token_info(*s).unwrap().token_initialized())
            .expect("SoftHSM offers a free slot");
        ctx.init_token(free, &AuthPin::from(SO_PIN), label).unwrap();
        // Slot ids change after initialisation: find the token again by its label.
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
            .expect("the new token is listed under its label");
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::So, Some(&AuthPin::from(SO_PIN)))
            .unwrap();
        session.init_pin(&AuthPin::from(USER_PIN)).unwrap();
        session.logout().unwrap();
        session.close().unwrap();
        Token {
            ctx,
            label: label.to_owned(),
        }
    }

    /// A signer config for `key_label` on this token with `sessions` pooled sessions.
    pub fn config(&self, key_label: &str, sessions: usize) -> HsmConfig {
        HsmConfig {
            sessions,
            ..HsmConfig::new(
                module_path(),
                &self.label,
                AuthPin::from(USER_PIN),
                key_label,
            )
        }
    }

    /// The slot holding this token now.
    pub fn slot(&self) -> signers::hsm::cryptoki::slot::Slot {
        self.ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| self.ctx.get_token_info(*s).unwrap().label() == self.label)
            .expect("token present")
    }
}
