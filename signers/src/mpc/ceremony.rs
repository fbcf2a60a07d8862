//! The offline ceremony: distributed key generation and aux-info generation for `n` parties.
//!
//! Each party runs in its own thread with its own single-threaded tokio runtime and talks
//! to the others only through the coordinator's [`Hub`] over loopback TCP. Each party
//! pregenerates its safe primes, runs aux-info generation, then threshold key generation,
//! completes its key share and writes it to `DIR/party-<i>.share.json` (mode 0600) itself:
//! the coordinator never sees a share, only the public key each party reports, which must
//! agree.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy_primitives::Address;
use cggmp21::round_based::MpcParty;
use cggmp21::supported_curves::Secp256k1;
use cggmp21::{ExecutionId, KeyShare, PregeneratedPrimes};
use rand::RngCore;
use rand::rngs::OsRng;
use tokio::net::{TcpListener, TcpStream};

use super::net::{Hub, delivery};
use super::share::{ShareFile, hex_encode};
use super::wire::{Frame, ProtoKind, read_frame, write_frame};
use crate::SignerError;

/// Parameters of [`run_ceremony`].
#[derive(Clone)]
pub struct CeremonyConfig {
    /// Number of parties `n` (2 ..= 64).
    pub parties: u16,
    /// Signers needed to sign, `t` (2 ..= n).
    pub threshold: u16,
    /// Folder the share files are written to (created if missing; existing share files are
    /// never overwritten).
    pub out_dir: PathBuf,
    /// Safe primes for each party's Paillier key, `primes[i]` for party `i`; empty: each
    /// party generates its own (the slow part, seconds to a minute per party). Supplying
    /// them is for tests with throwaway keys: whoever knows a party's primes knows its
    /// Paillier secret.
    pub primes: Vec<PregeneratedPrimes>,
}

impl CeremonyConfig {
    /// A ceremony whose parties generate their own primes.
    pub fn new(parties: u16, threshold: u16, out_dir: PathBuf) -> Self {
        Self {
            parties,
            threshold,
            out_dir,
            primes: Vec::new(),
        }
    }
}

impl std::fmt::Debug for CeremonyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeremonyConfig")
            .field("parties", &self.parties)
            .field("threshold", &self.threshold)
            .field("out_dir", &self.out_dir)
            .field("pregenerated_primes", &self.primes.len())
            .finish()
    }
}

/// What a ceremony produced. Holds no secret.
#[derive(Clone, Debug)]
pub struct CeremonyOutput {
    /// Compressed SEC1 public key, hex.
    pub public_key: String,
    /// Ethereum address of the shared key.
    pub address: Address,
    /// The share files, in party order (`share_files[i]` is party `i`'s).
    pub share_files: Vec<PathBuf>,
    /// Wall time of the whole ceremony.
    pub elapsed: Duration,
}

/// Path of party `i`'s share file in `dir`.
pub fn share_path(dir: &Path, i: u16) -> PathBuf {
    dir.join(format!("party-{i}.share.json"))
}

const CEREMONY_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs key generation and aux-info generation for `cfg.parties` parties, each in its own
/// thread, over loopback TCP, and writes each party's share file. Blocks for seconds.
///
/// Errors are [`SignerError::Config`] naming the output folder or the parameter at fault.
pub fn run_ceremony(cfg: &CeremonyConfig) -> Result<CeremonyOutput, SignerError> {
    let started = std::time::Instant::now();
    let (n, t) = (cfg.parties, cfg.threshold);
    if !(2..=64).contains(&n) {
        return Err(SignerError::Config {
            what: "mpc ceremony parties".into(),
            reason: format!("{n} is not in 2..=64"),
        });
    }
    if !(2..=n).contains(&t) {
        return Err(SignerError::Config {
            what: "mpc ceremony threshold".into(),
            reason: format!("{t} is not in 2..={n}"),
        });
    }
    let dir_err = |reason: String| SignerError::Config {
        what: format!("mpc ceremony output folder {}", cfg.out_dir.display()),
        reason,
    };
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| dir_err(e.to_string()))?;
    if !cfg.primes.is_empty() && cfg.primes.len() != n as usize {
        return Err(SignerError::Config {
            what: "mpc ceremony primes".into(),
            reason: format!("{} prime pairs for {n} parties", cfg.primes.len()),
        });
    }
    let share_files: Vec<PathBuf> = (0..n).map(|i| share_path(&cfg.out_dir, i)).collect();
    if let Some(p) = share_files.iter().find(|p| p.exists()) {
        return Err(dir_err(format!("{} already exists", p.display())));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| dir_err(format!("tokio runtime: {e}")))?;
    let fail = |reason: String| SignerError::Config {
        what: "mpc ceremony".into(),
        reason,
    };
    let mut session = [0u8; 16];
    OsRng.fill_bytes(&mut session);
    let session = hex_encode(&session);

    let listener = rt
        .block_on(TcpListener::bind(("127.0.0.1", 0)))
        .map_err(|e| fail(format!("bind loopback: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| fail(format!("listener address: {e}")))?;

    let parties: Vec<_> = share_files
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let path = path.clone();
            let primes = cfg.primes.get(i).cloned();
            std::thread::Builder::new()
                .name(format!("mpc-ceremony-{i}"))
                .spawn(move || ceremony_party(addr, i as u16, n, t, primes, &path))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("spawn party thread: {e}")))?;

    let coordinated = rt.block_on(async move {
        let mut hub = Hub::accept(&listener, n, Duration::from_secs(60)).await?;
        // No more connections: a party that has not connected yet sees a refusal.
        drop(listener);
        let res = async {
            hub.run(
                1,
                ProtoKind::AuxInfo,
                &format!("ceremony/{session}/aux"),
                CEREMONY_TIMEOUT,
            )
            .await?;
            hub.run(
                2,
                ProtoKind::Keygen,
                &format!("ceremony/{session}/keygen"),
                CEREMONY_TIMEOUT,
            )
            .await
        }
        .await;
        hub.shutdown().await;
        res
    });
    // Closes every party connection still open, so no party waits on a dead hub.
    drop(rt);
    let mut party_errors = Vec::new();
    for (i, h) in parties.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => party_errors.push(format!("party {i}: {e}")),
            Err(_) => party_errors.push(format!("party {i} panicked")),
        }
    }
    let keys = match coordinated {
        Ok(keys) if party_errors.is_empty() => keys,
        Ok(_) => return Err(fail(party_errors.join("; "))),
        Err(e) => {
            party_errors.insert(0, e);
            return Err(fail(party_errors.join("; ")));
        }
    };
    let public_key = keys[0].clone();
    if keys.iter().any(|k| *k != public_key) {
        return Err(fail("parties disagree on the shared public key".into()));
    }
    // Every party wrote its file; read one back through the same checks the signer uses.
    let first = ShareFile::load(&share_files[0])?;
    if first.public_key != public_key {
        return Err(fail(
            "share file does not hold the reported public key".into(),
        ));
    }
    Ok(CeremonyOutput {
        public_key,
        address: first.address,
        share_files,
        elapsed: started.elapsed(),
    })
}

/// One party of the ceremony; returns a description of what failed (never share content).
fn ceremony_party(
    hub: std::net::SocketAddr,
    i: u16,
    n: u16,
    t: u16,
    primes: Option<PregeneratedPrimes>,
    path: &Path,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let stream = TcpStream::connect(hub).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (mut r, mut w) = stream.into_split();
        write_frame(&mut w, &Frame::Hello { party: i })
            .await
            .map_err(|e| e.to_string())?;
        // Safe primes: the slow, local part of aux-info generation (seconds to a minute
        // per party), done after connecting so the hub knows every party is alive.
        let mut primes = Some(primes.unwrap_or_else(|| PregeneratedPrimes::generate(&mut OsRng)));
        let mut aux = None;
        let mut finished = false;
        loop {
            let frame = match read_frame(&mut r).await {
                Ok(f) => f,
                // The hub closed after the last execution.
                Err(_) if finished => return Ok(()),
                Err(_) => return Err("coordinator went away".into()),
            };
            let (exec, kind, eid) = match frame {
                Frame::Start { exec, kind, eid } => (exec, kind, eid),
                Frame::Shutdown => return Ok(()),
                _ => continue,
            };
            let eid_bytes = eid.into_bytes();
            let eid = ExecutionId::new(&eid_bytes);
            let outcome: Result<String, String> = match kind {
                ProtoKind::AuxInfo => match primes.take() {
                    Some(primes) => {
                        let party = MpcParty::connected(delivery(&mut r, &mut w, i, exec));
                        match cggmp21::aux_info_gen(eid, i, n, primes)
                            .start(&mut OsRng, party)
                            .await
                        {
                            Ok(a) => {
                                aux = Some(a);
                                Ok(String::new())
                            }
                            Err(e) => Err(format!("aux info generation: {e}")),
                        }
                    }
                    None => Err("aux info requested twice".into()),
                },
                ProtoKind::Keygen => match aux.take() {
                    Some(aux) => {
                        let party = MpcParty::connected(delivery(&mut r, &mut w, i, exec));
                        match cggmp21::keygen::<Secp256k1>(eid, i, n)
                            .set_threshold(t)
                            .start(&mut OsRng, party)
                            .await
                        {
                            Ok(incomplete) => KeyShare::from_parts((incomplete, aux))
                                .map_err(|e| format!("completing key share: {e}"))
                                .and_then(ShareFile::new)
                                .and_then(|file| {
                                    file.write_new(path)
                                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                                    Ok(file.public_key.clone())
                                }),
                            Err(e) => Err(format!("key generation: {e}")),
                        }
                    }
                    None => Err("key generation before aux info".into()),
                },
                ProtoKind::Presign => Err("presignature requested during the ceremony".into()),
            };
            let failed = outcome.clone().err();
            write_frame(&mut w, &Frame::Done { exec, outcome })
                .await
                .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e);
            }
            finished |= kind == ProtoKind::Keygen;
        }
    })
}
