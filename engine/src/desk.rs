//! A desk-side client of protocol v1, for the demo, the tests and the load generator.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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
}

/// One desk connection.
#[derive(Debug)]
pub struct Desk {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Desk {
    /// Connects to `url` (`ws://HOST:PORT/v1/ws`) with a bearer token (or none).
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Desk, DeskError> {
        let mut req = url.into_client_request()?;
        if let Some(t) = token {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| DeskError::Ws(WsError::HttpFormat(e.into())))?;
            req.headers_mut().insert("Authorization", v);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let _ = match ws.get_ref() {
                    MaybeTlsStream::Plain(s) => s.set_nodelay(true),
                    _ => Ok(()),
                };
                Ok(Desk { ws })
            }
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

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
