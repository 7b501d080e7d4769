//! Fenced locks for the app, over etcd's lock API on the shared connection.
//!
//! Each acquisition gets a lease of its own (the requested TTL) that Outrider keeps alive
//! while it runs, so a lock lives until the app releases it, the sidecar shuts down (every
//! held lock is released), or the sidecar dies (the lease expires after the TTL). The
//! fencing token is the creation revision of the lock's key: etcd revisions only grow, so
//! every later holder of the same lock has a larger token, and storage the app writes to can
//! refuse a stale holder.
//! Must not: report a lock as held that etcd did not grant, or leave a lease behind a failed
//! or abandoned acquisition.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::LockOptions;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::etcd::Etcd;

/// Where lock keys live in etcd.
const PREFIX: &str = "outrider/locks/";

/// The locks this sidecar holds for its app.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    held: Mutex<HashMap<String, Held>>,
}

#[derive(Debug)]
struct Held {
    key: Vec<u8>,
    lease: i64,
    token: i64,
    /// Stops the lease's keepalive.
    keepalive: CancellationToken,
}

/// A granted lock, as the app sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub lock: String,
    pub token: i64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    #[error("lock {0} is held by another instance (waited {1:?})")]
    Busy(String, Duration),
    #[error("this sidecar already holds lock {0} (token {1})")]
    AlreadyHeld(String, i64),
    #[error("this sidecar does not hold lock {0}")]
    NotHeld(String),
    #[error("etcd: {0}")]
    Etcd(String),
}

type Result<T> = std::result::Result<T, LockError>;

fn etcd_error(e: impl std::fmt::Display) -> LockError {
    LockError::Etcd(e.to_string())
}

impl Locks {
    /// Acquires `name` with a lease of `ttl`, waiting up to `wait` for the holder to let go.
    pub(crate) async fn acquire(
        &self,
        etcd: &Etcd,
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Granted> {
        if let Some(h) = self.held.lock().await.get(name) {
            return Err(LockError::AlreadyHeld(name.to_string(), h.token));
        }
        let mut client = etcd.client().await.map_err(etcd_error)?;
        let t = etcd.config().request_timeout;
        let grant = tokio::time::timeout(t, client.lease_grant(ttl.as_secs().max(1) as i64, None)).await;
        let lease = grant.map_err(etcd_error)?.map_err(etcd_error)?.id();
        let keepalive = CancellationToken::new();
        tokio::spawn(keep_alive(client.clone(), lease, ttl, keepalive.clone()));
        let locked = tokio::time::timeout(
            wait,
            client.lock(format!("{PREFIX}{name}"), Some(LockOptions::new().with_lease(lease))),
        );
        // Revoking the lease withdraws our place in the queue, or the lock once granted.
        let abandon = |mut client: etcd_client::Client| {
            keepalive.cancel();
            async move {
                let _ = tokio::time::timeout(t, client.lease_revoke(lease)).await;
            }
        };
        let key = match locked.await {
            Ok(Ok(resp)) => resp.key().to_vec(),
            Err(_) => {
                abandon(client).await;
                return Err(LockError::Busy(name.to_string(), wait));
            }
            Ok(Err(e)) => {
                abandon(client).await;
                return Err(etcd_error(e));
            }
        };
        // The token is the key's creation revision; without it the lock is of no use.
        let got = tokio::time::timeout(t, client.get(key.clone(), None)).await.map_err(etcd_error);
        let token = match got.and_then(|r| r.map_err(etcd_error)) {
            Ok(got) => got.kvs().first().map_or(0, |kv| kv.create_revision()),
            Err(e) => {
                abandon(client).await;
                return Err(e);
            }
        };
        tracing::info!(lock = name, token, "lock acquired for the app");
        self.held.lock().await.insert(name.to_string(), Held { key, lease, token, keepalive });
        Ok(Granted { lock: name.to_string(), token })
    }

    /// Releases `name` (its key and its lease).
    pub(crate) async fn release(&self, etcd: &Etcd, name: &str) -> Result<()> {
        let held = self.held.lock().await.remove(name).ok_or_else(|| LockError::NotHeld(name.to_string()))?;
        release(etcd, name, held).await
    }

    /// Releases every lock this sidecar holds (shutdown).
    pub(crate) async fn release_all(&self, etcd: &Etcd) {
        let all: Vec<(String, Held)> = self.held.lock().await.drain().collect();
        for (name, held) in all {
            let _ = release(etcd, &name, held).await;
        }
    }

    pub(crate) async fn list(&self) -> Vec<Granted> {
        let held = self.held.lock().await;
        let mut list: Vec<Granted> =
            held.iter().map(|(n, h)| Granted { lock: n.clone(), token: h.token }).collect();
        list.sort_by(|a, b| a.lock.cmp(&b.lock));
        list
    }
}

async fn release(etcd: &Etcd, name: &str, held: Held) -> Result<()> {
    held.keepalive.cancel();
    let mut client = etcd.client().await.map_err(etcd_error)?;
    let t = etcd.config().request_timeout;
    let _ = tokio::time::timeout(t, client.unlock(held.key)).await;
    tokio::time::timeout(t, client.lease_revoke(held.lease))
        .await
        .map_err(etcd_error)?
        .map_err(etcd_error)?;
    tracing::info!(lock = name, token = held.token, "lock released");
    Ok(())
}

/// Keeps a lock's lease alive (every third of its TTL) until cancelled or it fails.
async fn keep_alive(mut client: etcd_client::Client, lease: i64, ttl: Duration, stop: CancellationToken) {
    let Ok((mut keeper, mut acks)) = client.lease_keep_alive(lease).await else { return };
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                if keeper.keep_alive().await.is_err() || !matches!(acks.message().await, Ok(Some(a)) if a.ttl() > 0) {
                    tracing::warn!(lease, "a lock's lease could not be renewed: the lock may be lost");
                    return;
                }
            }
        }
    }
}
