//! Registration of the local app in etcd: health-gated, leased, withdrawn on shutdown.
//!
//! The key (`<prefix><address>`, etcd's naming format) exists only while the app passes its
//! health gate. It is attached to a lease that a keepalive refreshes, so a crashed Outrider's
//! key disappears when the lease lapses (no ghost nodes). A lost lease, a key someone deleted,
//! or a broken connection leads to a fresh registration on the next healthy check.
//! Must not: register an app that has not passed its gate, or outlive shutdown's withdrawal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions, WatchStream,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{EtcdConfig, RegisterConfig};
use crate::etcd::Etcd;
use crate::upstream::health::{Prober, Streak};

/// The running registration task.
#[derive(Debug)]
pub struct Registrar {
    pub config: (RegisterConfig, EtcdConfig),
    state: Arc<Mutex<&'static str>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A live registration: the lease, its keepalive, and a watch on our own key.
struct Lease {
    client: Client,
    id: i64,
    keeper: LeaseKeeper,
    acks: LeaseKeepAliveStream,
    watch: WatchStream,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

// === impl Registrar ===

impl Registrar {
    pub(crate) fn start(register: RegisterConfig, etcd: Arc<Etcd>) -> Registrar {
        let state = Arc::new(Mutex::new("waiting_for_health"));
        let stop = CancellationToken::new();
        let config = (register.clone(), etcd.config().clone());
        let task = tokio::spawn(run(register, etcd, state.clone(), stop.clone()));
        Registrar { config, state, stop, task }
    }

    /// `waiting_for_health`, `registered`, `withdrawn` (gate failing) or `error`.
    pub fn state(&self) -> &'static str {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the key and revokes the lease, then returns.
    pub async fn withdraw(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(cfg: RegisterConfig, etcd: Arc<Etcd>, state: Arc<Mutex<&'static str>>, stop: CancellationToken) {
    let set = |s: &'static str| *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let h = &cfg.health;
    let prober = Prober::new(h.kind.clone(), h.timeout);
    // The app starts out unhealthy: it is registered only after passing its gate.
    let (mut healthy, mut streak) = (false, Streak::default());
    let mut lease: Option<Lease> = None;
    let mut check = tokio::time::interval(cfg.health.interval);
    let mut keepalive = tokio::time::interval(cfg.lease_ttl / 3);
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                if let Some(l) = lease.take() {
                    l.delete(&cfg, &etcd).await;
                }
                return;
            }
            _ = check.tick() => {
                healthy = streak.observe(healthy, prober.probe(h.addr).await, h.healthy_threshold, h.unhealthy_threshold);
                match (healthy, lease.is_some()) {
                    (true, false) => match Lease::register(&cfg, &etcd).await {
                        Ok(l) => {
                            tracing::info!(key = %cfg.key, "registered the app in etcd");
                            lease = Some(l);
                            set("registered");
                        }
                        Err(e) => {
                            tracing::warn!(key = %cfg.key, "registration failed, retrying: {e}");
                            set("error");
                        }
                    },
                    (false, true) => {
                        tracing::warn!(key = %cfg.key, "app failed its health gate: withdrawing the key");
                        set("withdrawn");
                        if let Some(l) = lease.take() {
                            l.delete(&cfg, &etcd).await;
                        }
                    }
                    _ => {}
                }
            }
            _ = keepalive.tick(), if lease.is_some() => {
                let Some(l) = lease.as_mut() else { continue };
                if let Err(e) = l.keep_alive().await {
                    tracing::warn!(key = %cfg.key, "lease lost, re-registering: {e}");
                    lease = None;
                    set("error");
                }
            }
            changed = watch_own_key(&mut lease) => {
                if let Err(e) = changed {
                    tracing::warn!(key = %cfg.key, "registration needs renewing: {e}");
                    lease = None;
                    set("error");
                } else if let Some(l) = lease.as_mut() {
                    tracing::warn!(key = %cfg.key, "our key was deleted by someone else: writing it again");
                    if let Err(e) = l.put(&cfg).await {
                        tracing::warn!(key = %cfg.key, "re-registration failed: {e}");
                        lease = None;
                        set("error");
                    }
                }
            }
        }
    }
}

/// When this instance first registered, in Unix seconds: the same in every re-registration,
/// so callers' slow start ramps it once, from the same moment in every client.
fn registered_at() -> u64 {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(0, |d| d.as_secs())
    })
}

/// Resolves when our key was deleted (`Ok`) or the watch broke (`Err`); pends without a lease.
async fn watch_own_key(lease: &mut Option<Lease>) -> Result<(), Error> {
    let Some(l) = lease.as_mut() else { return std::future::pending().await };
    loop {
        let resp = l.watch.message().await?.ok_or("watch closed")?;
        if resp.canceled() {
            return Err(format!("watch canceled: {}", resp.cancel_reason()).into());
        }
        if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
            return Ok(());
        }
    }
}

// === impl Lease ===

impl Lease {
    async fn register(cfg: &RegisterConfig, etcd: &Etcd) -> Result<Lease, Error> {
        let mut client = etcd.client().await?;
        let t = etcd.config().request_timeout;
        let grant =
            tokio::time::timeout(t, client.lease_grant(cfg.lease_ttl.as_secs() as i64, None)).await??;
        let (keeper, acks) = tokio::time::timeout(t, client.lease_keep_alive(grant.id())).await??;
        let watch =
            tokio::time::timeout(t, client.watch(cfg.key.as_str(), Some(WatchOptions::new()))).await??;
        let mut lease = Lease { client, id: grant.id(), keeper, acks, watch };
        lease.put(cfg).await?;
        Ok(lease)
    }

    async fn put(&mut self, cfg: &RegisterConfig) -> Result<(), Error> {
        let mut metadata = serde_json::Map::new();
        metadata.insert("weight".into(), cfg.weight.get().into());
        metadata.insert("registered_at".into(), registered_at().to_string().into());
        for (k, v) in &cfg.metadata {
            metadata.insert(k.clone(), v.clone().into());
        }
        if let Some(name) = &cfg.tls_server_name {
            metadata.insert("tls".into(), "true".into());
            metadata.insert("server_name".into(), name.clone().into());
        }
        let value = serde_json::json!({ "Op": 0, "Addr": cfg.address.to_string(), "Metadata": metadata });
        let put =
            self.client.put(cfg.key.as_str(), value.to_string(), Some(PutOptions::new().with_lease(self.id)));
        tokio::time::timeout(Duration::from_secs(5), put).await??;
        Ok(())
    }

    async fn keep_alive(&mut self) -> Result<(), Error> {
        self.keeper.keep_alive().await?;
        let ack = tokio::time::timeout(Duration::from_secs(5), self.acks.message()).await??;
        match ack {
            Some(ack) if ack.ttl() > 0 => Ok(()),
            Some(_) => Err("lease expired".into()),
            None => Err("keepalive stream closed".into()),
        }
    }

    /// Best effort: the lease expiring removes the key anyway.
    async fn delete(mut self, cfg: &RegisterConfig, etcd: &Etcd) {
        let t = etcd.config().request_timeout;
        match tokio::time::timeout(t, self.client.delete(cfg.key.as_str(), None)).await {
            Ok(Ok(_)) => tracing::info!(key = %cfg.key, "deregistered the app from etcd"),
            Ok(Err(e)) => {
                tracing::warn!(key = %cfg.key, "cannot delete the key (its lease will expire): {e}")
            }
            Err(_) => tracing::warn!(key = %cfg.key, "deleting the key timed out (its lease will expire)"),
        }
        let _ = tokio::time::timeout(t, self.client.lease_revoke(self.id)).await;
    }
}
