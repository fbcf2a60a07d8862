//! WebSocket plumbing shared by the three connection types: dialling,
//! the blocking handshake, the switch to non-blocking mode, mio registration,
//! and the JSON-RPC envelope every frame is first decoded into.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{HandshakeError, WebSocket};

use crate::error::VenueError;

/// A client WebSocket over a plain TCP stream.
pub(crate) type Ws = WebSocket<TcpStream>;

/// Bound on the TCP connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Splits `ws://host:port/path` into `(host, port)`. `wss` is refused: the
/// crate is built without TLS.
pub(crate) fn host_port(url: &str) -> Result<(String, u16), VenueError> {
    let bad = || VenueError::InvalidUrl(url.to_owned());
    let rest = url.strip_prefix("ws://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad());
    }
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 80,
            None => return Err(bad()),
        };
        return Ok((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_owned(), port.parse().map_err(|_| bad())?)),
        None => Ok((authority.to_owned(), 80)),
    }
}

/// Dials `url`, sets `TCP_NODELAY`, and performs the WebSocket handshake on
/// the blocking socket with `io_timeout` as read and write timeout. The
/// returned socket is still blocking, with those timeouts set.
pub(crate) fn connect_blocking(
    url: &str,
    read_buffer: usize,
    io_timeout: Duration,
) -> Result<Ws, VenueError> {
    let (host, port) = host_port(url)?;
    let connect_err = |source| VenueError::Connect {
        url: url.to_owned(),
        source,
    };
    let addrs = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(connect_err)?;
    let mut last = std::io::Error::new(ErrorKind::NotFound, "host resolved to no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = stream.ok_or_else(|| connect_err(last))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;

    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    match tungstenite::client::client_with_config(url, stream, Some(config)) {
        Ok((ws, _response)) => Ok(ws),
        // A blocking socket only "interrupts" when a timeout fired.
        Err(HandshakeError::Interrupted(_)) => Err(VenueError::Timeout("websocket handshake")),
        Err(HandshakeError::Failure(e)) => Err(e.into()),
    }
}

/// Switches the socket under `ws` to non-blocking mode.
pub(crate) fn set_nonblocking(ws: &Ws) -> Result<(), VenueError> {
    ws.get_ref().set_nonblocking(true)?;
    Ok(())
}

/// Registers the socket for read and write readiness (edge-triggered).
pub(crate) fn register(
    ws: &Ws,
    registry: &mio::Registry,
    token: mio::Token,
) -> Result<(), VenueError> {
    let fd = ws.get_ref().as_raw_fd();
    registry.register(
        &mut mio::unix::SourceFd(&fd),
        token,
        mio::Interest::READABLE | mio::Interest::WRITABLE,
    )?;
    Ok(())
}

/// Is this tungstenite error a "would block" (non-blocking) or a timeout
/// (blocking socket with a read timeout)?
pub(crate) fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io)
        if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// Outcome of pushing buffered bytes to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Everything was handed to the kernel.
    Done,
    /// The socket is full; the rest stays queued inside the WebSocket.
    Pending,
}

/// Flushes queued frames without blocking.
pub(crate) fn flush(ws: &mut Ws) -> Result<Flush, VenueError> {
    match ws.flush() {
        Ok(()) => Ok(Flush::Done),
        Err(e) if is_would_block(&e) => Ok(Flush::Pending),
        Err(e) => Err(e.into()),
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorObject {
    pub code: i64,
    pub message: String,
}

/// Any frame from the node: a reply (`id` + `result`/`error`) or a
/// notification (`method` + `params`). Borrowed: decoding allocates nothing
/// unless an error message is present.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope<'a> {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default, borrow)]
    pub method: Option<&'a str>,
    #[serde(default, borrow)]
    pub params: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub result: Option<&'a RawValue>,
    #[serde(default)]
    pub error: Option<ErrorObject>,
}

/// Writes `n` in decimal into `out` without allocating (beyond `out`'s own growth).
pub(crate) fn push_decimal<B: Extend<u8>>(out: &mut B, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().copied());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            host_port("ws://127.0.0.1:8545").unwrap(),
            ("127.0.0.1".into(), 8545)
        );
        assert_eq!(
            host_port("ws://localhost:1/x/y").unwrap(),
            ("localhost".into(), 1)
        );
        assert_eq!(host_port("ws://node").unwrap(), ("node".into(), 80));
        assert_eq!(host_port("ws://[::1]:9000/").unwrap(), ("::1".into(), 9000));
        assert!(matches!(
            host_port("wss://a:1"),
            Err(VenueError::InvalidUrl(_))
        ));
        assert!(matches!(
            host_port("http://a:1"),
            Err(VenueError::InvalidUrl(_))
        ));
        assert!(matches!(
            host_port("ws://a:port"),
            Err(VenueError::InvalidUrl(_))
        ));
        assert!(matches!(
            host_port("ws:///x"),
            Err(VenueError::InvalidUrl(_))
        ));
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut b = bytes::BytesMut::new();
            push_decimal(&mut b, n);
            assert_eq!(&b[..], n.to_string().as_bytes());
        }
    }

    #[test]
    fn envelope_reply_and_notification() {
        let r: Envelope<'_> =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":7,"result":"0x01"}"#).unwrap();
        assert_eq!(r.id, Some(7));
        assert_eq!(r.result.unwrap().get(), "\"0x01\"");
        let r: Envelope<'_> = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":8,"error":{"code":-32000,"message":"nonce too low","data":null}}"#,
        )
        .unwrap();
        let e = r.error.unwrap();
        assert_eq!((e.code, e.message.as_str()), (-32000, "nonce too low"));
        let n: Envelope<'_> = serde_json::from_str(
            r#"{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"0x1","result":{}}}"#,
        )
        .unwrap();
        assert_eq!((n.id, n.method), (None, Some("eth_subscription")));
        let null: Envelope<'_> = serde_json::from_str(r#"{"id":1,"result":null}"#).unwrap();
        assert!(null.result.is_none());
    }
}
