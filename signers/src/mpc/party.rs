//! The online signer's parties. Each party is two threads that share one in-memory table of
//! this party's presignature shares:
//! - the *offline* thread (own single-threaded tokio runtime) connects to the coordinator's
//!   protocol hub and runs presignature generation whenever told to, storing its share of
//!   each presignature under the presignature's id;
//! - the *online* thread (blocking `std::net`) answers [`Frame::Sign`] requests: it removes
//!   the presignature from the table and only then issues the partial signature, so a
//!   presignature yields at most one partial signature per party, ever (the table lives
//!   only in this process's memory; see the `mpc` module docs for restarts).
//!
//! The party's key share stays in the offline thread; nothing secret is written to a socket
//! except protocol messages addressed to the other parties.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use cggmp21::generic_ec::Scalar;
use cggmp21::round_based::MpcParty;
use cggmp21::supported_curves::Secp256k1;
use cggmp21::{DataToSign, ExecutionId, KeyShare, Presignature};
use rand::rngs::OsRng;
use tokio::net::TcpStream;

use super::net::delivery;
use super::wire::{
    Frame, ProtoKind, read_frame, read_frame_sync, spin_until_readable, write_frame,
    write_frame_sync,
};

type Table = Arc<Mutex<HashMap<u64, Presignature<Secp256k1>>>>;

/// Spawns party `i` (signing index; `parties_at_keygen[i]` is its keygen index). Returns
/// the offline and online thread handles.
pub(crate) fn spawn(
    i: u16,
    parties_at_keygen: Vec<u16>,
    share: KeyShare<Secp256k1>,
    hub: SocketAddr,
    online: SocketAddr,
    spin: Duration,
) -> std::io::Result<[JoinHandle<()>; 2]> {
    let table: Table = Arc::default();
    let t2 = Arc::clone(&table);
    let offline = std::thread::Builder::new()
        .name(format!("mpc-party-{i}-offline"))
        .spawn(move || offline_loop(i, &parties_at_keygen, &share, hub, &table))?;
    let online = std::thread::Builder::new()
        .name(format!("mpc-party-{i}-online"))
        .spawn(move || online_loop(i, online, &t2, spin))?;
    Ok([offline, online])
}

fn offline_loop(
    i: u16,
    parties_at_keygen: &[u16],
    share: &KeyShare<Secp256k1>,
    hub: SocketAddr,
    table: &Table,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok(stream) = TcpStream::connect(hub).await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let (mut r, mut w) = stream.into_split();
        if write_frame(&mut w, &Frame::Hello { party: i })
            .await
            .is_err()
        {
            return;
        }
        loop {
            let (exec, kind, eid) = match read_frame(&mut r).await {
                Ok(Frame::Start { exec, kind, eid }) => (exec, kind, eid),
                Ok(Frame::Shutdown) | Err(_) => return,
                Ok(_) => continue,
            };
            let outcome = if kind == ProtoKind::Presign {
                let eid_bytes = eid.into_bytes();
                let party = MpcParty::connected(delivery(&mut r, &mut w, i, exec));
                match cggmp21::signing(ExecutionId::new(&eid_bytes), i, parties_at_keygen, share)
                    .generate_presignature(&mut OsRng, party)
                    .await
                {
                    Ok(p) => {
                        table
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(exec, p);
                        Ok(String::new())
                    }
                    Err(e) => Err(format!("presignature generation: {e}")),
                }
            } else {
                Err(format!("{kind:?} is not run by the online signer"))
            };
            if write_frame(&mut w, &Frame::Done { exec, outcome })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

fn online_loop(i: u16, coordinator: SocketAddr, table: &Table, spin: Duration) {
    let Ok(stream) = std::net::TcpStream::connect(coordinator) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(read_half);
    let mut w = BufWriter::new(stream);
    if write_frame_sync(&mut w, &Frame::Hello { party: i }).is_err() || w.flush().is_err() {
        return;
    }
    let mut buf = Vec::with_capacity(256);
    loop {
        spin_until_readable(&r, spin);
        let (id, hash) = match read_frame_sync(&mut r, &mut buf) {
            Ok(Frame::Sign { id, hash }) => (id, hash),
            Ok(Frame::Shutdown) | Err(_) => return,
            Ok(_) => continue,
        };
        // Take the presignature out of the table first: whatever happens next, it is gone.
        let presig = table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let (partial, r_odd) = match presig {
            Some(p) => {
                let r_odd = p.R.to_bytes(true).as_bytes().first() == Some(&0x03);
                let m = DataToSign::from_scalar(Scalar::<Secp256k1>::from_be_bytes_mod_order(hash));
                (Ok(p.issue_partial_signature(m)), Some(r_odd))
            }
            None => (
                Err(format!(
                    "party {i} refused: presignature {} is unknown or already used",
                    super::PresignatureId(id)
                )),
                None,
            ),
        };
        if write_frame_sync(&mut w, &Frame::Partial { id, partial, r_odd }).is_err()
            || w.flush().is_err()
        {
            return;
        }
    }
}
