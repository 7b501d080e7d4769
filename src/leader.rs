//! Leader election among the app's instances, through etcd's election API on the shared
//! connection: campaign on a lease, lead while the lease is renewed in time, resign first on
//! shutdown.
//!
//! The term (fencing token) is the creation revision of our key under the election prefix:
//! etcd revisions only grow, so every later leader has a larger one, and an app (or the
//! storage it writes to) can refuse a stale leader's token.
//!
//! Stepping down before another can lead: etcd expires a lease `ttl` after the last
//! keepalive *it received*, which is after we sent it. We count leadership as valid until
//! `sent + ttl − ttl/4` of the last acknowledged keepalive and stop acting as leader when
//! that passes without a newer acknowledgement — a quarter of the TTL before etcd could let
//! anyone else win, which covers clock-rate differences and scheduling delay.
//! Must not: report leadership it cannot back with an unexpired lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, LeaderKey, ResignOptions};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{JobConfig, LeaderConfig};
use crate::etcd::Etcd;
use crate::jobs::{JobView, Jobs};

/// The running election task.
#[derive(Debug)]
pub struct Leader {
    pub config: (LeaderConfig, Vec<JobConfig>),
    view: Arc<Mutex<View>>,
    jobs: Jobs,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Leadership as `/leader` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub leader: bool,
    /// campaigning, leading, or error (then retrying).
    pub state: &'static str,
    /// When this instance became leader (Unix milliseconds).
    pub since: Option<u64>,
    /// The fencing token of the current term: grows with every new leader.
    pub term: Option<i64>,
    pub election: String,
    pub identity: String,
    /// Times this instance gained or lost leadership.
    pub changes: u64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

impl Leader {
    /// Campaigns for `config`'s election and runs `jobs` while leading.
    pub(crate) fn start(config: LeaderConfig, jobs: Vec<JobConfig>, etcd: Arc<Etcd>) -> Leader {
        let view = Arc::new(Mutex::new(View {
            leader: false,
            state: "campaigning",
            since: None,
            term: None,
            election: config.election.clone(),
            identity: config.identity.clone(),
            changes: 0,
        }));
        let stop = CancellationToken::new();
        let (leading, watching) = tokio::sync::watch::channel(None);
        let jobs_runner = Jobs::start(jobs.clone(), watching, stop.child_token());
        let state = State { view: view.clone(), leading };
        let task = tokio::spawn(run(config.clone(), etcd, state, stop.clone()));
        Leader { config: (config, jobs), view, jobs: jobs_runner, stop, task }
    }

    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs.view()
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resigns (if leading) and stops campaigning; returns once etcd has been told.
    pub async fn resign(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Leadership as the election task keeps it: the view for `/leader`, and the current term
/// for the job scheduler (`None`: not leading).
struct State {
    view: Arc<Mutex<View>>,
    leading: tokio::sync::watch::Sender<Option<i64>>,
}

fn set(state: &State, leader: bool, name: &'static str, term: Option<i64>) {
    // Jobs hear first: a step-down stops them before anything else is updated.
    state.leading.send_replace(if leader { term } else { None });
    let mut v = state.view.lock().unwrap_or_else(|e| e.into_inner());
    if leader != v.leader {
        v.changes += 1;
        if leader {
            tracing::info!(election = %v.election, term = ?term, "leadership gained");
        } else {
            tracing::warn!(election = %v.election, term = ?v.term, state = name, "leadership lost");
        }
    }
    if leader && !v.leader {
        v.since = Some(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64));
    } else if !leader {
        v.since = None;
    }
    (v.leader, v.state, v.term) = (leader, name, if leader { term } else { None });
}

async fn run(cfg: LeaderConfig, etcd: Arc<Etcd>, view: State, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match term(&cfg, &etcd, &view, &stop).await {
            Ok(()) => return,
            Err(e) => {
                set(&view, false, "error", None);
                tracing::warn!(election = %cfg.election, retry_in = ?backoff, "leader election failed: {e}");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.ttl);
    }
}

/// One lease: campaign on it, lead while it is renewed in time. `Ok` only on shutdown.
async fn term(cfg: &LeaderConfig, etcd: &Etcd, view: &State, stop: &CancellationToken) -> Result<(), Error> {
    let mut client = etcd.client().await?;
    let t = etcd.config().request_timeout;
    let ttl = cfg.ttl;
    let lease = tokio::time::timeout(t, client.lease_grant(ttl.as_secs() as i64, None)).await??.id();
    let (mut keeper, mut acks) = tokio::time::timeout(t, client.lease_keep_alive(lease)).await??;
    let margin = ttl / 4;
    let mut valid_until = Instant::now() + ttl - margin;
    let every = ttl / 3;
    set(view, false, "campaigning", None);
    let campaign = {
        let mut c = client.clone();
        let (name, value) = (cfg.election.clone(), cfg.identity.clone());
        async move { c.campaign(name, value, lease).await }
    };
    tokio::pin!(campaign);
    let mut leading: Option<LeaderKey> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                set(view, false, "resigned", None);
                return resign(&mut client, leading, lease, t).await;
            }
            won = &mut campaign, if leading.is_none() => {
                let key = won?.take_leader().ok_or("campaign answered without a leader key")?;
                set(view, true, "leading", Some(key.rev()));
                leading = Some(key);
            }
            _ = tick.tick() => {
                let sent = Instant::now();
                keeper.keep_alive().await?;
                match tokio::time::timeout(every, acks.message()).await {
                    Ok(Ok(Some(ack))) if ack.ttl() > 0 => valid_until = sent + ttl - margin,
                    Ok(Ok(Some(_))) => return Err("lease expired".into()),
                    Ok(Ok(None)) => return Err("keepalive stream closed".into()),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {} // no answer yet; the deadline below decides
                }
            }
            () = tokio::time::sleep_until(valid_until) => {
                return Err(format!("lease not renewed within {:?}: stepped down before it could expire", ttl - margin).into());
            }
        }
    }
}

/// Resigns the leadership (so another instance wins at once) and revokes the lease.
async fn resign(
    client: &mut Client,
    leading: Option<LeaderKey>,
    lease: i64,
    t: Duration,
) -> Result<(), Error> {
    if let Some(key) = leading {
        let resigned =
            tokio::time::timeout(t, client.resign(Some(ResignOptions::new().with_leader(key)))).await;
        match resigned {
            Ok(Ok(_)) => tracing::info!("resigned the leadership"),
            Ok(Err(e)) => tracing::warn!("resigning failed (the lease's end will free it): {e}"),
            Err(_) => tracing::warn!("resigning timed out (the lease's end will free it)"),
        }
    }
    let _ = tokio::time::timeout(t, client.lease_revoke(lease)).await;
    Ok(())
}
