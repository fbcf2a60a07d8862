//! Frames on the loopback sockets between the coordinator and the parties.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of JSON (one
//! [`Frame`]). Protocol messages travel as [`Frame::Proto`] with the cggmp21 message kept as
//! raw JSON, so the hub that routes them never decodes (or needs to understand) their
//! contents. Frames are written with one `write_all` of a buffer built in full first.
//!
//! Invariant: no frame ever carries a key share or a presignature; the only secret-derived
//! values that cross a socket are protocol messages (which the protocol is designed to
//! publish to the other parties) and partial signatures (which are not sensitive).

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use cggmp21::PartialSignature;
use cggmp21::supported_curves::Secp256k1;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest frame accepted (aux-info messages with their proofs are a few hundred KiB).
pub(crate) const MAX_FRAME: usize = 64 << 20;

/// Which protocol a [`Frame::Start`] starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProtoKind {
    /// Auxiliary info (Paillier keys and ring-Pedersen parameters), at the ceremony.
    AuxInfo,
    /// Threshold distributed key generation, at the ceremony.
    Keygen,
    /// One presignature, online side.
    Presign,
}

/// One message on a coordinator <-> party socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Frame {
    /// First frame a party sends on a connection: its index in the running protocol.
    Hello {
        /// Keygen index at the ceremony; signing index (0..t) on the online side.
        party: u16,
    },
    /// Coordinator -> parties: start execution `exec` of a protocol.
    Start {
        /// Execution number, unique within this coordinator's run.
        exec: u64,
        /// Which protocol.
        kind: ProtoKind,
        /// The protocol's execution id (never repeats; see the module docs of `mpc`).
        eid: String,
    },
    /// A protocol message between parties, routed by the coordinator.
    Proto {
        /// Execution the message belongs to.
        exec: u64,
        /// Sender (overwritten by the hub with the index of the connection it came from).
        from: u16,
        /// `None`: broadcast to every other party; `Some(j)`: to party `j` only.
        to: Option<u16>,
        /// Message number assigned by the hub.
        msg_id: u64,
        /// The cggmp21 message as JSON.
        payload: Box<RawValue>,
    },
    /// Party -> coordinator: execution `exec` finished (`Ok` carries a public result such as
    /// the shared public key, or nothing).
    Done {
        /// Execution number.
        exec: u64,
        /// Outcome; errors are descriptions without secret material.
        outcome: Result<String, String>,
    },
    /// Coordinator -> party: issue a partial signature over `hash` with presignature `id`.
    Sign {
        /// Presignature id.
        id: u64,
        /// The 32-byte prehash.
        hash: B256,
    },
    /// Party -> coordinator: the partial signature, or why the party refused.
    Partial {
        /// Presignature id the reply is for.
        id: u64,
        /// The partial signature, or the reason it was not issued.
        partial: Result<PartialSignature<Secp256k1>, String>,
        /// Parity of the presignature's nonce point `R` (public: `r` is its x coordinate),
        /// so the coordinator can try the right recovery id first.
        #[serde(default)]
        r_odd: Option<bool>,
    },
    /// Coordinator -> party: stop.
    Shutdown,
}

fn encode(frame: &Frame) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut buf, frame).map_err(io::Error::other)?;
    let len = u32::try_from(buf.len() - 4).map_err(|_| io::Error::other("frame too large"))?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

fn decode(body: &[u8]) -> io::Result<Frame> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn check_len(len: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit"),
        ));
    }
    Ok(len)
}

/// Writes one frame to a blocking stream.
pub(crate) fn write_frame_sync(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&encode(frame)?)
}

/// Reads one frame from a blocking stream, reusing `buf` for the body.
pub(crate) fn read_frame_sync(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = check_len(len)?;
    buf.resize(len, 0);
    r.read_exact(buf)?;
    decode(buf)
}

/// Writes one frame to an async stream.
pub(crate) async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> io::Result<()> {
    w.write_all(&encode(frame)?).await
}

/// Probes before this many spin hints; after them each probe is followed by a yield.
const SPIN_PROBES: u32 = 64;

/// Waits until `r` has bytes to read (or its peer closed, or the socket failed), for at
/// most `window`: it probes the socket without consuming anything, spinning for the first
/// probes and yielding the core between later ones, then returns so that the caller's
/// blocking read parks the thread. This is the online path's spin-then-park wait: while
/// requests come faster than `window`, a party and the coordinator see each other's frames
/// without a thread wake-up (tens of microseconds on a small machine); an idle signer
/// blocks in the kernel and costs nothing. `window` zero skips the spin.
pub(crate) fn spin_until_readable(r: &BufReader<TcpStream>, window: Duration) {
    if window.is_zero() || !r.buffer().is_empty() {
        return;
    }
    let fd = r.get_ref().as_raw_fd();
    let start = Instant::now();
    let mut probes = 0u32;
    loop {
        let mut byte = 0u8;
        // SAFETY: `fd` is the open socket owned by `r`, borrowed for the whole call; the
        // buffer is one writable byte that outlives the call; MSG_PEEK leaves the data in
        // the socket and MSG_DONTWAIT makes this call never block, whatever the socket's
        // blocking mode.
        let n = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
            // Data, end of stream or an error: the blocking read reports which.
            return;
        }
        if start.elapsed() >= window {
            return;
        }
        probes += 1;
        if probes < SPIN_PROBES {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Reads one frame from an async stream.
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_byte_stream() {
        let payload = RawValue::from_string("{\"a\":[1,2,3]}".to_owned()).unwrap();
        let frames = [
            Frame::Hello { party: 2 },
            Frame::Proto {
                exec: 7,
                from: 1,
                to: Some(0),
                msg_id: 9,
                payload,
            },
            Frame::Sign {
                id: 5,
                hash: B256::repeat_byte(0xab),
            },
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            write_frame_sync(&mut bytes, f).unwrap();
        }
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        for f in &frames {
            let got = read_frame_sync(&mut r, &mut buf).unwrap();
            assert_eq!(format!("{got:?}"), format!("{f:?}"));
        }
        assert!(read_frame_sync(&mut r, &mut buf).is_err());
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let bytes = u32::MAX.to_be_bytes();
        let err = read_frame_sync(&mut &bytes[..], &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
