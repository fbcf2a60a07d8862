//! Address risk (KYT): a snapshot of risk scores and sanctions hits, loaded from a feed
//! file or an HTTP endpoint by a refresher thread and handed to the policy stage whole.
//!
//! Invariants:
//! - The policy stage only reads a snapshot; loading, parsing and fetching happen on the
//!   refresher thread (never on the hot path). A new snapshot replaces the old one
//!   between two decisions.
//! - An entry is fresh for the policy's TTL after it was observed (the feed's
//!   `observed_at`, else the time it was loaded). An expired entry is never read as clean:
//!   the policy's `on_expired` (deny or approval) applies; a sanctions hit always denies,
//!   expired or not.
//! - If the feed cannot be loaded, the previous snapshot stays and ages out: failing to
//!   refresh makes decisions stricter, never looser.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::Address;
use serde::Deserialize;

/// One address's risk as the feed gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KytEntry {
    /// Risk score 0 (clean) to 100.
    pub score: u8,
    /// On a sanctions list.
    pub sanctioned: bool,
    /// When the score was observed (unix ns).
    pub observed_ns: u64,
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KytLookup {
    /// On a sanctions list (fresh or not).
    Sanctioned,
    /// A score within its TTL.
    Fresh {
        /// Score.
        score: u8,
        /// Age in ns.
        age_ns: u64,
    },
    /// A score older than the TTL.
    Expired {
        /// Score.
        score: u8,
        /// Age in ns.
        age_ns: u64,
    },
    /// The feed does not know the address.
    Missing,
}

/// A loaded feed.
#[derive(Debug, Default)]
pub struct KytSnapshot {
    entries: HashMap<Address, KytEntry>,
    /// When it was loaded (unix ns).
    pub loaded_ns: u64,
}

/// Feed and fetch errors.
#[derive(Debug, thiserror::Error)]
pub enum KytError {
    /// The feed could not be read or fetched.
    #[error("KYT feed {source_name}: {reason}")]
    Fetch {
        /// File or URL.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// The feed is not valid.
    #[error("KYT feed: {0}")]
    Parse(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedFile {
    entries: Vec<FeedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedEntry {
    address: Address,
    score: u8,
    #[serde(default)]
    sanctioned: bool,
    /// Unix seconds.
    #[serde(default)]
    observed_at: Option<u64>,
}

impl KytSnapshot {
    /// Parses a feed (`{"entries": [{"address", "score", "sanctioned"?, "observed_at"?}]}`).
    pub fn parse(bytes: &[u8], now_ns: u64) -> Result<KytSnapshot, KytError> {
        let f: FeedFile =
            serde_json::from_slice(bytes).map_err(|e| KytError::Parse(e.to_string()))?;
        let mut entries = HashMap::with_capacity(f.entries.len());
        for e in f.entries {
            if e.score > 100 {
                return Err(KytError::Parse(format!(
                    "{}: score {} is above 100",
                    e.address, e.score
                )));
            }
            entries.insert(
                e.address,
                KytEntry {
                    score: e.score,
                    sanctioned: e.sanctioned,
                    observed_ns: e
                        .observed_at
                        .map_or(now_ns, |s| s.saturating_mul(1_000_000_000).min(now_ns)),
                },
            );
        }
        Ok(KytSnapshot {
            entries,
            loaded_ns: now_ns,
        })
    }

    /// Builds a snapshot from entries (tests, benches).
    pub fn from_entries(
        entries: impl IntoIterator<Item = (Address, KytEntry)>,
        now_ns: u64,
    ) -> Self {
        Self {
            entries: entries.into_iter().collect(),
            loaded_ns: now_ns,
        }
    }

    /// Number of addresses known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the snapshot is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks an address up at `now_ns` with entries valid for `ttl_ns`.
    #[inline]
    pub fn lookup(&self, a: &Address, now_ns: u64, ttl_ns: u64) -> KytLookup {
        match self.entries.get(a) {
            None => KytLookup::Missing,
            Some(e) if e.sanctioned => KytLookup::Sanctioned,
            Some(e) => {
                let age_ns = now_ns.saturating_sub(e.observed_ns);
                if age_ns < ttl_ns {
                    KytLookup::Fresh {
                        score: e.score,
                        age_ns,
                    }
                } else {
                    KytLookup::Expired {
                        score: e.score,
                        age_ns,
                    }
                }
            }
        }
    }
}

/// Where the feed comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KytSource {
    /// A JSON file, re-read on every refresh.
    File(PathBuf),
    /// An `http://` URL answering the JSON with a GET.
    Http(String),
}

impl KytSource {
    /// Parses `file:PATH`, a bare path, or `http://…`.
    pub fn parse(s: &str) -> KytSource {
        if s.starts_with("http://") {
            KytSource::Http(s.to_owned())
        } else {
            KytSource::File(PathBuf::from(s.strip_prefix("file:").unwrap_or(s)))
        }
    }

    fn name(&self) -> String {
        match self {
            KytSource::File(p) => p.display().to_string(),
            KytSource::Http(u) => u.clone(),
        }
    }

    /// Reads or fetches the feed (blocking; the refresher's thread only).
    pub fn fetch(&self) -> Result<Vec<u8>, KytError> {
        let fail = |reason: String| KytError::Fetch {
            source_name: self.name(),
            reason,
        };
        match self {
            KytSource::File(p) => std::fs::read(p).map_err(|e| fail(e.to_string())),
            KytSource::Http(url) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), http_get(url)).await
                })
                .map_err(|_| fail("timed out after 5 s".into()))?
                .map_err(fail)
            }
        }
    }
}

async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// Counters of the refresher, for `/metrics`.
#[derive(Debug, Default)]
pub struct KytStats {
    /// Snapshots loaded.
    pub loads: AtomicU64,
    /// Failed refreshes.
    pub failures: AtomicU64,
    /// Entries in the last snapshot.
    pub entries: AtomicU64,
}

/// A thread that reloads the feed every `interval` and hands snapshots to `deliver`.
#[derive(Debug)]
pub struct KytRefresher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KytRefresher {
    /// Starts refreshing at once.
    pub fn spawn(
        source: KytSource,
        interval: Duration,
        stats: Arc<KytStats>,
        deliver: impl Fn(Box<KytSnapshot>) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kyt-refresh".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let now = crate::risk::unix_now_ns();
                    match source.fetch().and_then(|b| KytSnapshot::parse(&b, now)) {
                        Ok(snap) => {
                            stats.entries.store(snap.len() as u64, Ordering::Relaxed);
                            stats.loads.fetch_add(1, Ordering::Relaxed);
                            deliver(Box::new(snap));
                        }
                        Err(e) => {
                            stats.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "KYT refresh failed; the previous snapshot ages out");
                        }
                    }
                    // Sleep in short steps so stopping is prompt.
                    let until = std::time::Instant::now() + interval;
                    while !s.load(Ordering::Acquire) && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(20).min(interval));
                    }
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for KytRefresher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn lookups_age_and_sanctions_never_age_into_clean() {
        let a = Address::repeat_byte(1);
        let b = Address::repeat_byte(2);
        let feed = format!(
            r#"{{"entries":[{{"address":"{a}","score":12,"observed_at":1000}},
                           {{"address":"{b}","score":0,"sanctioned":true,"observed_at":1000}}]}}"#
        );
        let snap = KytSnapshot::parse(feed.as_bytes(), 2000 * S).unwrap();
        let ttl = 300 * S;
        assert_eq!(
            snap.lookup(&a, 1000 * S + ttl - 1, ttl),
            KytLookup::Fresh {
                score: 12,
                age_ns: ttl - 1
            }
        );
        assert!(matches!(
            snap.lookup(&a, 1000 * S + ttl, ttl),
            KytLookup::Expired { score: 12, .. }
        ));
        assert_eq!(snap.lookup(&b, 1000 * S, ttl), KytLookup::Sanctioned);
        assert_eq!(snap.lookup(&b, 9000 * S, ttl), KytLookup::Sanctioned);
        assert_eq!(
            snap.lookup(&Address::repeat_byte(3), 1000 * S, ttl),
            KytLookup::Missing
        );
    }

    #[test]
    fn bad_feeds_are_refused() {
        assert!(KytSnapshot::parse(b"{}", 0).is_err());
        let e = KytSnapshot::parse(
            br#"{"entries":[{"address":"0x0000000000000000000000000000000000000001","score":101}]}"#,
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("above 100"), "{e}");
    }
}
