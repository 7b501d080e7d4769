//! Following a key prefix for as long as its user lives: watch, then list.
//!
//! Algorithm: create a watch from etcd's current revision and wait for its confirmation,
//! get the prefix at revision R, publish the whole map of values, then apply the watch's
//! events after R and publish the map again after each batch. A watch that fell behind a
//! compaction is created and listed again; any other error retries with jittered exponential backoff on the shared
//! connection, while the user keeps what it last published — never an empty set because
//! etcd is away. Watches require a leader and the channel sends HTTP/2 keepalives, so a
//! partitioned member surfaces as an error instead of a silent hang.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::{Etcd, EtcdError, backoff};

/// The values under a prefix, by key.
pub(crate) type Values = BTreeMap<String, Vec<u8>>;

/// What `/upstreams` and `/metrics` show of a watch.
#[derive(Debug, Default)]
pub struct WatchStatus {
    pub revision: AtomicI64,
    pub reconnects: AtomicU64,
    /// Values the user could not read (logged and skipped).
    pub undecodable: AtomicU64,
    /// Endpoints refused because their address is outside `allowed_networks`.
    pub refused: AtomicU64,
    state: Mutex<(&'static str, Option<SystemTime>)>,
}

// === impl WatchStatus ===

impl WatchStatus {
    pub(crate) fn set_state(&self, state: &'static str) {
        self.lock().0 = state;
    }

    /// connecting, watching, disconnected (or snapshot: serving the saved set).
    pub fn state(&self) -> &'static str {
        self.lock().0
    }

    fn updated(&self, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.lock().1 = Some(SystemTime::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (&'static str, Option<SystemTime>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn seconds_since_update(&self) -> Option<f64> {
        self.lock().1.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let since = self.seconds_since_update();
        let (state, _) = *self.lock();
        serde_json::json!({
            "state": state,
            "revision": self.revision.load(Ordering::Relaxed),
            "seconds_since_update": since,
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "undecodable_values": self.undecodable.load(Ordering::Relaxed),
            "refused_endpoints": self.refused.load(Ordering::Relaxed),
        })
    }
}

/// Follows `prefix` until `stop`, calling `publish` with every value under it and the
/// revision they were read at. `what` names the watch in logs.
pub(crate) async fn follow(
    etcd: Arc<Etcd>,
    prefix: String,
    what: String,
    status: Arc<WatchStatus>,
    stop: CancellationToken,
    mut publish: impl FnMut(&Values, i64),
) {
    if status.lock().0.is_empty() {
        status.set_state("connecting");
    }
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = session(&etcd, &prefix, &status, &mut attempt, &mut publish) => r,
        };
        let Err(e) = result;
        etcd.failed(&e).await;
        status.reconnects.fetch_add(1, Ordering::Relaxed);
        status.set_state("disconnected");
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::warn!(watch = %what, retry_in = ?delay, "etcd watch failed, keeping what it last delivered: {e}");
        tokio::select! {
            () = stop.cancelled() => return,
            back = etcd.wait_for_retry(delay, e.is_connectivity()) => if back {
                tracing::info!(watch = %what, "etcd is reachable again: retrying now");
                attempt = 0;
            },
        }
    }
}

/// Watch, then list, then follow the watch until an error. Never returns `Ok`.
///
/// The watch is created first (from etcd's current revision) and the list read after it is
/// confirmed, so nothing that changes between the two is lost and no compaction can fall in
/// a gap: listing first and watching from the list's revision + 1 lost a delete whose
/// tombstone a compaction at that very revision removed (the watch then stayed silent).
/// Events already in the list (revision at or below the list's) are skipped.
async fn session(
    etcd: &Etcd,
    prefix: &str,
    status: &WatchStatus,
    attempt: &mut u32,
    publish: &mut impl FnMut(&Values, i64),
) -> Result<std::convert::Infallible, EtcdError> {
    let mut client = etcd.client().await?;
    let timeout = etcd.config().request_timeout;
    let mut values = Values::new();
    loop {
        let mut stream = watch_from_now(&mut client, prefix, timeout).await?;
        let listed = list(&mut client, prefix, timeout, &mut values).await?;
        let mut revision = listed;
        publish(&values, revision);
        status.updated(revision);
        *attempt = 0;
        status.set_state("watching");
        loop {
            let Some(resp) = next_message(&mut stream, timeout).await? else {
                return Err(EtcdError::Ended("stream closed by etcd".into()));
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    tracing::info!(%prefix, compacted = resp.compact_revision(), "watch fell behind a compaction; watching and listing again");
                    break;
                }
                return Err(EtcdError::Ended(resp.cancel_reason().to_string()));
            }
            let mut changed = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.mod_revision() <= listed {
                    continue;
                }
                changed = true;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match event.event_type() {
                    EventType::Put => {
                        values.insert(key, kv.value().to_vec());
                    }
                    EventType::Delete => {
                        values.remove(&key);
                    }
                }
            }
            if let Some(h) = resp.header() {
                revision = revision.max(h.revision());
            }
            if changed {
                publish(&values, revision);
                status.updated(revision);
            }
        }
    }
}

/// A watch of `prefix` from etcd's current revision, once etcd has confirmed it.
async fn watch_from_now(
    client: &mut etcd_client::Client,
    prefix: &str,
    timeout: std::time::Duration,
) -> Result<etcd_client::WatchStream, EtcdError> {
    let confirmed = async {
        let mut stream = client.watch(prefix, Some(WatchOptions::new().with_prefix())).await?;
        match stream.message().await? {
            Some(resp) if resp.created() => Ok(stream),
            _ => Err(EtcdError::Ended("etcd did not confirm the watch".into())),
        }
    };
    tokio::time::timeout(timeout, confirmed).await.map_err(|_| EtcdError::Timeout(timeout))?
}

/// The next watch response. A stream quiet for `10 × request_timeout` (at least 10 s) is
/// asked for a progress report, which etcd answers at once on a live stream: no answer
/// within the request timeout ends the session, so a watch that silently stopped (seen once
/// after an etcd restart) is replaced instead of waiting forever.
async fn next_message(
    stream: &mut etcd_client::WatchStream,
    timeout: std::time::Duration,
) -> Result<Option<etcd_client::WatchResponse>, EtcdError> {
    let quiet = (timeout * 10).max(std::time::Duration::from_secs(10));
    if let Ok(message) = tokio::time::timeout(quiet, stream.message()).await {
        return Ok(message?);
    }
    stream.request_progress().await?;
    match tokio::time::timeout(timeout, stream.message()).await {
        Ok(message) => Ok(message?),
        Err(_) => Err(EtcdError::Timeout(timeout)),
    }
}

/// Reads the whole prefix into `values`; the revision it was read at.
async fn list(
    client: &mut etcd_client::Client,
    prefix: &str,
    timeout: std::time::Duration,
    values: &mut Values,
) -> Result<i64, EtcdError> {
    let get = client.get(prefix, Some(GetOptions::new().with_prefix()));
    let resp = tokio::time::timeout(timeout, get).await.map_err(|_| EtcdError::Timeout(timeout))??;
    values.clear();
    for kv in resp.kvs() {
        values.insert(String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec());
    }
    Ok(resp.header().map_or(0, |h| h.revision()))
}
