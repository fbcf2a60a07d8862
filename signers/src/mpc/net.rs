//! Message delivery for the interactive protocols (aux info, keygen, presignatures).
//!
//! Topology: a star. Each party holds one TCP connection to the coordinator's [`Hub`]; the
//! hub forwards each [`Frame::Proto`] to its recipient (or to every other party for a
//! broadcast), stamping the sender with the index of the connection the frame came from so
//! a party cannot speak for another. Parties run their protocol through [`delivery`], which
//! turns their half of the socket into the `Stream`/`Sink` pair `round_based` expects.
//!
//! Executions run one at a time per hub: the hub sends [`Frame::Start`], routes messages
//! until every party has answered [`Frame::Done`], and only then starts the next. Frames of
//! another execution arriving late are dropped, never delivered into the wrong one.

use std::io;
use std::time::Duration;

use cggmp21::round_based::{Incoming, MessageDestination, MessageType, Outgoing};
use futures::{Sink, Stream};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::wire::{Frame, ProtoKind, read_frame, write_frame};

/// The coordinator's end: one connection per party, indexed by the party's index.
pub(crate) struct Hub {
    writers: Vec<OwnedWriteHalf>,
    events: mpsc::UnboundedReceiver<(u16, io::Result<Frame>)>,
    next_msg_id: u64,
}

impl Hub {
    /// Accepts `n` parties on `listener`; each must introduce itself with a distinct
    /// [`Frame::Hello`] index below `n`. Must run inside a tokio runtime.
    pub(crate) async fn accept(
        listener: &TcpListener,
        n: u16,
        timeout: Duration,
    ) -> Result<Hub, String> {
        let mut slots: Vec<Option<(OwnedReadHalf, OwnedWriteHalf)>> =
            (0..n).map(|_| None).collect();
        let accept_all = async {
            for _ in 0..n {
                let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let (mut r, w) = stream.into_split();
                match read_frame(&mut r).await.map_err(|e| e.to_string())? {
                    Frame::Hello { party } if party < n && slots[party as usize].is_none() => {
                        slots[party as usize] = Some((r, w));
                    }
                    other => return Err(format!("unexpected first frame {}", frame_name(&other))),
                }
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(timeout, accept_all)
            .await
            .map_err(|_| "parties did not connect in time".to_owned())??;
        let (tx, events) = mpsc::unbounded_channel();
        let mut writers = Vec::with_capacity(n as usize);
        for (i, slot) in slots.into_iter().enumerate() {
            let Some((mut r, w)) = slot else {
                return Err(format!("party {i} did not connect"));
            };
            writers.push(w);
            let tx = tx.clone();
            let i = i as u16;
            tokio::spawn(async move {
                loop {
                    let frame = read_frame(&mut r).await;
                    let end = frame.is_err();
                    if tx.send((i, frame)).is_err() || end {
                        break;
                    }
                }
            });
        }
        Ok(Hub {
            writers,
            events,
            next_msg_id: 0,
        })
    }

    /// Runs one execution: starts it at every party, routes its messages, and returns each
    /// party's [`Frame::Done`] outcome in party order. Fails on the first party error, a
    /// closed connection, or after `timeout`.
    pub(crate) async fn run(
        &mut self,
        exec: u64,
        kind: ProtoKind,
        eid: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let start = Frame::Start {
            exec,
            kind,
            eid: eid.to_owned(),
        };
        for w in &mut self.writers {
            write_frame(w, &start).await.map_err(|e| e.to_string())?;
        }
        let n = self.writers.len();
        let mut done: Vec<Option<String>> = vec![None; n];
        let route = async {
            while done.iter().any(Option::is_none) {
                let Some((from, frame)) = self.events.recv().await else {
                    return Err("all party connections closed".to_owned());
                };
                let frame = frame.map_err(|e| format!("party {from}: connection: {e}"))?;
                match frame {
                    Frame::Proto {
                        exec: e,
                        to,
                        payload,
                        ..
                    } if e == exec => {
                        self.next_msg_id += 1;
                        let fwd = Frame::Proto {
                            exec,
                            from,
                            to,
                            msg_id: self.next_msg_id,
                            payload,
                        };
                        match to {
                            Some(j) => {
                                let w = self
                                    .writers
                                    .get_mut(j as usize)
                                    .ok_or_else(|| format!("party {from} sent to unknown {j}"))?;
                                write_frame(w, &fwd).await.map_err(|e| e.to_string())?;
                            }
                            None => {
                                for (j, w) in self.writers.iter_mut().enumerate() {
                                    if j != from as usize {
                                        write_frame(w, &fwd).await.map_err(|e| e.to_string())?;
                                    }
                                }
                            }
                        }
                    }
                    Frame::Done { exec: e, outcome } if e == exec => match outcome {
                        Ok(v) => done[from as usize] = Some(v),
                        Err(reason) => return Err(format!("party {from}: {reason}")),
                    },
                    // Late frames of an earlier execution.
                    Frame::Proto { .. } | Frame::Done { .. } => {}
                    other => {
                        return Err(format!(
                            "party {from} sent unexpected {}",
                            frame_name(&other)
                        ));
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, route)
            .await
            .map_err(|_| format!("{kind:?} execution {exec} timed out"))??;
        Ok(done.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Tells every party to stop (best effort).
    pub(crate) async fn shutdown(&mut self) {
        for w in &mut self.writers {
            let _ = write_frame(w, &Frame::Shutdown).await;
        }
    }
}

/// Short name of a frame for error messages (never its contents).
pub(crate) fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Start { .. } => "Start",
        Frame::Proto { .. } => "Proto",
        Frame::Done { .. } => "Done",
        Frame::Sign { .. } => "Sign",
        Frame::Partial { .. } => "Partial",
        Frame::Shutdown => "Shutdown",
    }
}

/// Party side: the `(incoming, outgoing)` pair for `round_based::MpcParty::connected`, for
/// execution `exec`, over this party's connection to the hub.
#[allow(clippy::type_complexity)]
pub(crate) fn delivery<'a, M>(
    r: &'a mut OwnedReadHalf,
    w: &'a mut OwnedWriteHalf,
    me: u16,
    exec: u64,
) -> (
    std::pin::Pin<Box<dyn Stream<Item = Result<Incoming<M>, io::Error>> + Send + 'a>>,
    std::pin::Pin<Box<dyn Sink<Outgoing<M>, Error = io::Error> + Send + 'a>>,
)
where
    M: Serialize + DeserializeOwned + Send + 'a,
{
    let incoming = futures::stream::unfold(r, move |r| async move {
        loop {
            let frame = match read_frame(r).await {
                Ok(f) => f,
                Err(e) => return Some((Err(e), r)),
            };
            match frame {
                Frame::Proto {
                    exec: e,
                    from,
                    to,
                    msg_id,
                    payload,
                } if e == exec => {
                    let msg_type = if to.is_some() {
                        MessageType::P2P
                    } else {
                        MessageType::Broadcast
                    };
                    let item = serde_json::from_str::<M>(payload.get())
                        .map(|msg| Incoming {
                            id: msg_id,
                            sender: from,
                            msg_type,
                            msg,
                        })
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                    return Some((item, r));
                }
                Frame::Proto { .. } => continue,
                Frame::Shutdown => {
                    return Some((
                        Err(io::Error::new(io::ErrorKind::Interrupted, "shutdown")),
                        r,
                    ));
                }
                other => {
                    return Some((
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unexpected {} during a protocol", frame_name(&other)),
                        )),
                        r,
                    ));
                }
            }
        }
    });
    let outgoing = futures::sink::unfold(w, move |w, out: Outgoing<M>| async move {
        let payload = serde_json::value::to_raw_value(&out.msg).map_err(io::Error::other)?;
        let to = match out.recipient {
            MessageDestination::AllParties => None,
            MessageDestination::OneParty(j) => Some(j),
        };
        let frame = Frame::Proto {
            exec,
            from: me,
            to,
            msg_id: 0,
            payload,
        };
        write_frame(w, &frame).await?;
        Ok::<_, io::Error>(w)
    });
    (Box::pin(incoming), Box::pin(outgoing))
}
