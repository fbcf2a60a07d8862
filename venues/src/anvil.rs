//! The dev chain: finding, starting and supervising Foundry's `anvil`.
//!
//! [`Anvil::spawn`] starts anvil on `127.0.0.1` with `--port 0`, so the kernel
//! picks a free port and there is no window in which another process can take
//! it; the real port is read from anvil's `Listening on 127.0.0.1:PORT` line.
//! Two threads drain anvil's stdout and stderr for the life of the process (a
//! full pipe would stall the node) and keep the last lines for error reports.
//! The child is killed and reaped when the [`Anvil`] is dropped.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, address};

use crate::error::VenueError;
use crate::rpc::RpcClient;

/// The anvil version the project pins (`scripts/setup.sh` installs it).
pub const ANVIL_VERSION: &str = "1.7.1";

/// Environment variable naming an anvil binary; checked after an explicit path.
pub const ANVIL_ENV: &str = "ENGINE_ANVIL";

/// Chain id anvil uses unless told otherwise.
pub const DEFAULT_CHAIN_ID: u64 = 31337;

/// Private keys of anvil's default accounts 0..9 (mnemonic
/// `test test test test test test test test test test test junk`, path
/// `m/44'/60'/0'/0/i`), as 32-byte hex strings **with** the `0x` prefix,
/// exactly as anvil prints them. Public knowledge: dev chains only.
pub const DEV_PRIVATE_KEYS: [&str; 10] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
];

/// Addresses of [`DEV_PRIVATE_KEYS`], index for index. Each holds 10,000 ETH
/// at genesis.
pub const DEV_ADDRESSES: [Address; 10] = [
    address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
    address!("70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    address!("3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    address!("90F79bf6EB2c4f870365E785982E1f101E93b906"),
    address!("15d34AAf54267DB7D7c367839AAf71A00a2C6A65"),
    address!("9965507D1a55bcC2695C58ba16FB37d819B0A4dc"),
    address!("976EA74026E726554dB657fA54763abd0C3a0aa9"),
    address!("14dC79964da2C08b23698B3D3cc7Ca32193d9955"),
    address!("23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f"),
    address!("a0Ee7A142d267C1f36714E4a8F75612F20a79720"),
];

/// The address of dev account `i` (0..=9). Panics if `i > 9`.
pub const fn dev_address(i: usize) -> Address {
    DEV_ADDRESSES[i]
}

/// How long [`Anvil::spawn`] waits for anvil to print its address and then
/// to answer `eth_chainId`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines of anvil's output are kept for error reports.
const OUTPUT_TAIL_LINES: usize = 40;

/// The npm package folder the binary lives in, for this platform.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const NPM_PLATFORM: &str = "linux-amd64";
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
const NPM_PLATFORM: &str = "linux-arm64";
#[cfg(all(target_os = "macos", target_arch = "x86_64"))]
const NPM_PLATFORM: &str = "darwin-amd64";
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
const NPM_PLATFORM: &str = "darwin-arm64";
#[cfg(not(any(
    all(target_os = "linux", target_arch = "x86_64"),
    all(target_os = "linux", target_arch = "aarch64"),
    all(target_os = "macos", target_arch = "x86_64"),
    all(target_os = "macos", target_arch = "aarch64"),
)))]
const NPM_PLATFORM: &str = "unsupported-platform";

/// The path of anvil below a project root, as `scripts/setup.sh` installs it.
pub fn project_local_anvil(root: &Path) -> PathBuf {
    root.join(".tools")
        .join("node_modules")
        .join("@foundry-rs")
        .join(format!("anvil-{NPM_PLATFORM}"))
        .join("bin")
        .join("anvil")
}

/// How to start anvil.
#[derive(Clone, Debug, Default)]
pub struct AnvilConfig {
    /// Explicit path to the binary; wins over every other place.
    pub binary: Option<PathBuf>,
    /// `None`: automine (a block per transaction). `Some(d)`: a fixed block
    /// time, passed as fractional seconds (`--block-time 0.5` works).
    pub block_time: Option<Duration>,
    /// `--chain-id`; anvil's default is 31337.
    pub chain_id: Option<u64>,
    /// `--accounts`; anvil's default is 10.
    pub accounts: Option<u32>,
    /// Further arguments, appended verbatim.
    pub extra_args: Vec<String>,
}

impl AnvilConfig {
    /// A config with a fixed block time.
    pub fn with_block_time(block_time: Duration) -> Self {
        Self {
            block_time: Some(block_time),
            ..Self::default()
        }
    }

    /// The command-line arguments this config adds after `--host/--port`.
    fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(bt) = self.block_time {
            args.push("--block-time".into());
            args.push(format!("{}", bt.as_secs_f64()).into());
        }
        if let Some(id) = self.chain_id {
            args.push("--chain-id".into());
            args.push(id.to_string().into());
        }
        if let Some(n) = self.accounts {
            args.push("--accounts".into());
            args.push(n.to_string().into());
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// Finds the anvil binary.
///
/// Order: `explicit`, then the `ENGINE_ANVIL` environment variable, then the
/// project-local `.tools/node_modules/@foundry-rs/anvil-<platform>/bin/anvil`
/// in every ancestor of the current directory, of the current executable's
/// directory and of this crate's workspace root, then every `PATH` entry.
///
/// An explicit path or `ENGINE_ANVIL` that is set but does not name an
/// executable file is an error on its own (a configured binary is never
/// silently replaced by another). The error lists every path tried.
pub fn locate_anvil(explicit: Option<&Path>) -> Result<PathBuf, VenueError> {
    let env = std::env::var_os(ANVIL_ENV).filter(|v| !v.is_empty());
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        starts.push(dir);
    }
    starts.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let path_var = std::env::var_os("PATH");
    locate_in(
        explicit,
        env.as_deref().map(Path::new),
        &starts,
        path_var.as_deref(),
    )
}

/// [`locate_anvil`] with every input explicit, for tests.
pub(crate) fn locate_in(
    explicit: Option<&Path>,
    env: Option<&Path>,
    starts: &[PathBuf],
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, VenueError> {
    if let Some(p) = explicit {
        return check_configured(p);
    }
    if let Some(p) = env {
        return check_configured(p);
    }
    let mut searched: Vec<PathBuf> = Vec::new();
    for start in starts {
        let start = start.canonicalize().unwrap_or_else(|_| start.clone());
        for dir in start.ancestors() {
            let candidate = project_local_anvil(dir);
            if searched.contains(&candidate) {
                continue;
            }
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    if let Some(path_var) = path_var {
        for dir in std::env::split_paths(path_var) {
            let candidate = dir.join("anvil");
            if searched.contains(&candidate) {
                continue;
            }
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    Err(VenueError::AnvilNotFound { searched })
}

fn check_configured(p: &Path) -> Result<PathBuf, VenueError> {
    if is_executable(p) {
        Ok(p.to_path_buf())
    } else {
        Err(VenueError::AnvilNotFound {
            searched: vec![p.to_path_buf()],
        })
    }
}

fn is_executable(p: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(p) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Runs `anvil --version` and returns its first line
/// (e.g. `anvil Version: 1.7.1`).
pub fn anvil_version(binary: &Path) -> Result<String, VenueError> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(VenueError::AnvilSpawn)?;
    if !out.status.success() {
        return Err(VenueError::AnvilExited {
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

/// The last lines anvil wrote, shared with the drain threads.
type OutputTail = Arc<Mutex<VecDeque<String>>>;

/// A running anvil process, killed on drop.
///
/// Owned by whoever started it (a test, the engine's dev mode); not shared
/// between threads except through its URLs.
#[derive(Debug)]
pub struct Anvil {
    /// The child; `None` once it has been killed and reaped.
    child: Option<Child>,
    pid: u32,
    host: String,
    port: u16,
    binary: PathBuf,
    chain_id: u64,
    tail: OutputTail,
    /// Set once the exit was observed, so it is reported consistently.
    exit: Option<String>,
    /// The threads draining stdout and stderr (they end at the pipes' end of file).
    drains: Vec<std::thread::JoinHandle<()>>,
}

impl Anvil {
    /// Starts anvil on a free loopback port and returns once it answers
    /// `eth_chainId`. Blocks for at most 30 s (anvil usually needs tens of
    /// milliseconds).
    pub fn spawn(cfg: &AnvilConfig) -> Result<Anvil, VenueError> {
        let binary = locate_anvil(cfg.binary.as_deref())?;
        let mut cmd = Command::new(&binary);
        cmd.args(["--host", "127.0.0.1", "--port", "0"])
            .args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(VenueError::AnvilSpawn)?;
        let pid = child.id();
        let tail: OutputTail = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_TAIL_LINES)));

        let (tx, rx) = mpsc::channel::<(String, u16)>();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let drains = vec![
            spawn_drain(
                format!("anvil-{pid}-out"),
                stdout,
                Arc::clone(&tail),
                Some(tx),
            )?,
            spawn_drain(format!("anvil-{pid}-err"), stderr, Arc::clone(&tail), None)?,
        ];

        let mut anvil = Anvil {
            child: Some(child),
            pid,
            host: String::new(),
            port: 0,
            binary,
            chain_id: cfg.chain_id.unwrap_or(DEFAULT_CHAIN_ID),
            tail,
            exit: None,
            drains,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok((host, port)) => {
                anvil.host = host;
                anvil.port = port;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stdout closed without the listening line: the process is
                // gone or about to be.
                let status = anvil.wait_exit(Duration::from_secs(5));
                return Err(VenueError::AnvilExited {
                    status,
                    output: anvil.exit_output(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(VenueError::Timeout("anvil to print its listening address"));
            }
        }
        anvil.wait_ready(deadline)?;
        Ok(anvil)
    }

    /// Connects and asks `eth_chainId` until anvil answers with the expected id.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), VenueError> {
        let url = self.ws_url();
        loop {
            let attempt = RpcClient::connect(&url).and_then(|mut c| c.chain_id());
            match attempt {
                Ok(id) if id == self.chain_id => return Ok(()),
                Ok(_) => return Err(VenueError::Protocol("anvil reports an unexpected chain id")),
                Err(e) => {
                    if let Some(status) = self.exited() {
                        return Err(VenueError::AnvilExited {
                            status,
                            output: self.exit_output(),
                        });
                    }
                    if Instant::now() >= deadline {
                        return Err(match e {
                            VenueError::Timeout(_) => {
                                VenueError::Timeout("anvil to answer eth_chainId")
                            }
                            other => other,
                        });
                    }
                    // Bounded retry: anvil printed its address, so this is
                    // at most a few scheduler ticks.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Waits (bounded) for the child to exit and describes its status.
    fn wait_exit(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() >= deadline {
                return "still running".to_owned();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The TCP port anvil listens on (HTTP and WebSocket share it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:PORT`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}:{}", self.host, self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The binary that was started.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The chain id anvil was started with.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// A new blocking RPC client connected to this anvil.
    pub fn rpc(&self) -> Result<RpcClient, VenueError> {
        RpcClient::connect(&self.ws_url())
    }

    /// The last lines anvil printed (stdout and stderr interleaved), for
    /// diagnostics.
    pub fn output_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// [`Anvil::output_tail`] once the process has exited: waits (at most 2 s) for both
    /// pipes to be drained to their end, so the last words of a process that exited
    /// (on stderr, say) are there even when the other pipe closed first.
    fn exit_output(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.drains.iter().all(std::thread::JoinHandle::is_finished)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.output_tail()
    }

    /// Supervision: `Some(status)` once the process has exited (never
    /// blocks). After [`Anvil::kill`] this reports the kill.
    pub fn exited(&mut self) -> Option<String> {
        if self.exit.is_some() {
            return self.exit.clone();
        }
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status.to_string());
                self.child = None;
                self.exit.clone()
            }
            Ok(None) => None,
            Err(e) => {
                self.exit = Some(format!("unknown ({e})"));
                self.exit.clone()
            }
        }
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            match child.wait() {
                Ok(status) => self.exit = Some(status.to_string()),
                Err(e) => self.exit = Some(format!("unknown ({e})")),
            }
        }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Drains one of anvil's pipes line by line into `tail`; on stdout it also
/// reports the first `Listening on HOST:PORT` line through `listening`.
fn spawn_drain(
    name: String,
    pipe: impl Read + Send + 'static,
    tail: OutputTail,
    mut listening: Option<mpsc::Sender<(String, u16)>>,
) -> Result<std::thread::JoinHandle<()>, VenueError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::with_capacity(256);
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                if listening.is_some()
                    && let Some(addr) = parse_listening(line)
                    && let Some(tx) = listening.take()
                {
                    let _ = tx.send(addr);
                }
                if line.is_empty() {
                    continue;
                }
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == OUTPUT_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line.to_owned());
            }
        })
        .map_err(VenueError::Io)
}

/// Parses `Listening on 127.0.0.1:8545` into `("127.0.0.1", 8545)`.
fn parse_listening(line: &str) -> Option<(String, u16)> {
    let rest = line.trim().strip_prefix("Listening on ")?;
    let (host, port) = rest.trim().rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_line() {
        assert_eq!(
            parse_listening("Listening on 127.0.0.1:36095"),
            Some(("127.0.0.1".to_owned(), 36095))
        );
        assert_eq!(parse_listening("    Block Number: 1"), None);
        assert_eq!(parse_listening("Listening on 127.0.0.1:x"), None);
    }

    #[test]
    fn block_time_is_fractional_seconds() {
        let cfg = AnvilConfig::with_block_time(Duration::from_millis(500));
        assert_eq!(
            cfg.args(),
            vec![OsString::from("--block-time"), OsString::from("0.5")]
        );
        let cfg = AnvilConfig::with_block_time(Duration::from_secs(1));
        assert_eq!(cfg.args()[1], OsString::from("1"));
    }

    fn make_exe(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn explicit_path_wins_and_a_bad_one_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let local = project_local_anvil(dir.path());
        make_exe(&local);
        let explicit = dir.path().join("my-anvil");
        make_exe(&explicit);
        let starts = vec![dir.path().to_path_buf()];
        assert_eq!(
            locate_in(Some(&explicit), None, &starts, None).unwrap(),
            explicit
        );

        let missing = dir.path().join("nope");
        match locate_in(Some(&missing), None, &starts, None) {
            Err(VenueError::AnvilNotFound { searched }) => assert_eq!(searched, vec![missing]),
            other => panic!("expected AnvilNotFound, got {other:?}"),
        }
    }

    #[test]
    fn env_comes_before_project_local() {
        let dir = tempfile::tempdir().unwrap();
        make_exe(&project_local_anvil(dir.path()));
        let from_env = dir.path().join("env-anvil");
        make_exe(&from_env);
        let starts = vec![dir.path().to_path_buf()];
        assert_eq!(
            locate_in(None, Some(&from_env), &starts, None).unwrap(),
            from_env
        );
    }

    #[test]
    fn project_local_is_found_from_a_subdirectory_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let sub = root.join("a").join("b");
        std::fs::create_dir_all(&sub).unwrap();
        let local = project_local_anvil(&root);
        make_exe(&local);
        assert_eq!(
            locate_in(None, None, std::slice::from_ref(&sub), None).unwrap(),
            local
        );

        // Without the project-local copy, PATH is used.
        std::fs::remove_file(&local).unwrap();
        let bin = root.join("bin");
        make_exe(&bin.join("anvil"));
        let path_var = std::env::join_paths([root.join("empty"), bin.clone()]).unwrap();
        assert_eq!(
            locate_in(None, None, &[sub], Some(&path_var)).unwrap(),
            bin.join("anvil")
        );
    }

    #[test]
    fn not_found_lists_every_place_searched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let path_var = std::env::join_paths([root.join("p1"), root.join("p2")]).unwrap();
        // A non-executable file is not accepted.
        let local = project_local_anvil(&root);
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, "").unwrap();
        let err = locate_in(None, None, std::slice::from_ref(&root), Some(&path_var)).unwrap_err();
        let VenueError::AnvilNotFound { searched } = &err else {
            panic!("{err:?}")
        };
        assert!(searched.contains(&local), "{searched:?}");
        assert!(searched.contains(&root.join("p1").join("anvil")));
        assert!(searched.contains(&root.join("p2").join("anvil")));
        let msg = err.to_string();
        assert!(msg.contains(&local.display().to_string()), "{msg}");
        assert!(msg.contains("p2"), "{msg}");
    }
}
