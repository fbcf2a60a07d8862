//! A desk-side client of protocol v1, for the demo, the tests and the load generator.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The byte stream under a desk's WebSocket: plain TCP or TLS.
pub trait DeskIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug> DeskIo
    for T
{
}

/// Why a desk connection failed.
#[derive(Debug, thiserror::Error)]
pub enum DeskError {
    /// The engine refused the upgrade with this HTTP status (401 for a bad token).
    #[error("upgrade refused with HTTP {0}")]
    Refused(u16),
    /// Transport error.
    #[error("websocket: {0}")]
    Ws(#[from] WsError),
    /// The engine closed the connection.
    #[error("connection closed")]
    Closed,
    /// The engine sent something that is not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// The URL could not be used (no host, or a scheme that does not fit the call).
    #[error("url: {0}")]
    Url(String),
    /// The TCP connection or the TLS handshake failed.
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
}

/// One desk connection.
#[derive(Debug)]
pub struct Desk {
    ws: Ws,
}

impl Desk {
    /// Connects to `url` (`ws://HOST:PORT/v1/ws`) with a bearer token (or none).
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Desk, DeskError> {
        if !url.starts_with("ws://") {
            return Err(DeskError::Url(format!(
                "{url}: Desk::connect speaks ws://; use Desk::connect_tls for wss://"
            )));
        }
        let tcp = TcpStream::connect(host_port(url, 80)?).await?;
        let _ = tcp.set_nodelay(true);
        Self::handshake(url, token, Box::new(tcp)).await
    }

    /// Connects to `url` (`wss://HOST:PORT/v1/ws`) over TLS with `tls` (its roots decide
    /// which server certificates are trusted; a client certificate in it is presented
    /// for mTLS).
    pub async fn connect_tls(
        url: &str,
        token: Option<&str>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Desk, DeskError> {
        if !url.starts_with("wss://") {
            return Err(DeskError::Url(format!("{url}: expected wss://")));
        }
        let addr = host_port(url, 443)?;
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| DeskError::Url(format!("{host}: {e}")))?;
        let tcp = TcpStream::connect(&addr).await?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Self::handshake(url, token, Box::new(stream)).await
    }

    /// Does the WebSocket handshake for `url` (`ws://…`) with a bearer token (or none) on
    /// a stream the caller connected (e.g. a socket with its own buffer sizes).
    pub async fn connect_over(
        url: &str,
        token: Option<&str>,
        io: Box<dyn DeskIo>,
    ) -> Result<Desk, DeskError> {
        Self::handshake(url, token, io).await
    }

    async fn handshake(
        url: &str,
        token: Option<&str>,
        io: Box<dyn DeskIo>,
    ) -> Result<Desk, DeskError> {
        let mut req = url.into_client_request()?;
        if let Some(t) = token {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| DeskError::Ws(WsError::HttpFormat(e.into())))?;
            req.headers_mut().insert("Authorization", v);
        }
        match tokio_tungstenite::client_async(req, io).await {
            Ok((ws, _)) => Ok(Desk { ws }),
            Err(WsError::Http(resp)) => Err(DeskError::Refused(resp.status().as_u16())),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a JSON value as one text frame.
    pub async fn send(&mut self, v: &Value) -> Result<(), DeskError> {
        self.send_text(v.to_string()).await
    }

    /// Sends raw text (for malformed-frame tests).
    pub async fn send_text(&mut self, text: String) -> Result<(), DeskError> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends a binary frame (which the protocol refuses).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), DeskError> {
        self.ws.send(Message::binary(bytes)).await?;
        Ok(())
    }

    /// Next JSON frame from the engine.
    pub async fn recv(&mut self) -> Result<Value, DeskError> {
        next_json(&mut self.ws).await
    }

    /// Next JSON frame, or `None` after `timeout`.
    pub async fn recv_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<Value>, DeskError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Splits into a sending and a receiving half (to send paced while reading).
    pub fn split(self) -> (DeskSender, DeskReceiver) {
        let (sink, stream) = self.ws.split();
        (DeskSender { sink }, DeskReceiver { stream })
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

type Ws = WebSocketStream<Box<dyn DeskIo>>;

/// `HOST:PORT` of a `ws://` or `wss://` URL (`default_port` when it names none).
fn host_port(url: &str, default_port: u16) -> Result<String, DeskError> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| DeskError::Url(format!("{url}: no scheme")))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(DeskError::Url(format!("{url}: no host")));
    }
    Ok(
        if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        },
    )
}

/// Sending half of a [`Desk`].
#[derive(Debug)]
pub struct DeskSender {
    sink: futures_util::stream::SplitSink<Ws, Message>,
}

impl DeskSender {
    /// Sends a JSON value as one text frame.
    pub async fn send(&mut self, v: &Value) -> Result<(), DeskError> {
        self.sink.send(Message::text(v.to_string())).await?;
        Ok(())
    }
}

/// Receiving half of a [`Desk`].
#[derive(Debug)]
pub struct DeskReceiver {
    stream: futures_util::stream::SplitStream<Ws>,
}

impl DeskReceiver {
    /// Next JSON frame from the engine.
    pub async fn recv(&mut self) -> Result<Value, DeskError> {
        next_json(&mut self.stream).await
    }
}

/// Next text frame of `stream`, parsed; control frames are skipped.
async fn next_json<S>(stream: &mut S) -> Result<Value, DeskError>
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|_| DeskError::NotJson(t.to_string()));
            }
            Some(Ok(Message::Close(_))) | None => return Err(DeskError::Closed),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}
