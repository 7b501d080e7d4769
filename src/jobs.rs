//! Leader-only scheduled jobs: an HTTP call to the local app on a cron schedule, made only
//! while this instance leads its election, with the term's fencing token in a header.
//!
//! Rules: a tick is run only if leadership (the same term) holds at the tick; ticks missed
//! while no instance led (a failover) are skipped, not caught up — a new leader starts with
//! the first tick after it won; with `concurrency: forbid` a tick while the previous run of
//! the job still goes is skipped. Every run is logged and counted.
//! Must not: run a tick without a valid leadership, or block the election on a slow app.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Utc};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{JobConfig, parse_offset, parse_schedule};

/// The header carrying the term's fencing token on every job call.
pub const FENCING_HEADER: &str = "x-outrider-fencing-token";

/// One job as `/jobs` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobView {
    pub name: String,
    pub schedule: String,
    pub timezone: String,
    /// The next tick this instance would run (only while it leads).
    pub next_run: Option<String>,
    pub last_run: Option<RunView>,
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub scheduled: String,
    pub term: i64,
    pub result: String,
    pub duration_ms: u64,
}

/// The scheduler of all jobs; its views are read by `/jobs` and `/metrics`.
#[derive(Debug, Clone)]
pub(crate) struct Jobs {
    pub(crate) views: Arc<Mutex<Vec<JobView>>>,
}

impl Jobs {
    /// Starts the scheduler: it runs jobs while `leading` holds a term, until `stop`.
    pub(crate) fn start(
        jobs: Vec<JobConfig>,
        leading: watch::Receiver<Option<i64>>,
        stop: CancellationToken,
    ) -> Jobs {
        let views = jobs
            .iter()
            .map(|j| JobView {
                name: j.name.clone(),
                schedule: j.schedule.clone(),
                timezone: j.timezone.clone(),
                ..JobView::default()
            })
            .collect();
        let views = Arc::new(Mutex::new(views));
        tokio::spawn(schedule_all(jobs, leading, views.clone(), stop));
        Jobs { views }
    }

    pub(crate) fn view(&self) -> Vec<JobView> {
        self.views.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// While a term lasts, one loop per job; they stop when the term ends.
async fn schedule_all(
    jobs: Vec<JobConfig>,
    mut leading: watch::Receiver<Option<i64>>,
    views: Arc<Mutex<Vec<JobView>>>,
    stop: CancellationToken,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    loop {
        let term = *leading.borrow_and_update();
        let during = stop.child_token();
        if let Some(term) = term {
            for (i, job) in jobs.iter().enumerate() {
                let (job, views, client) = (job.clone(), views.clone(), client.clone());
                let (leading, during) = (leading.clone(), during.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = during.cancelled() => {}
                        () = run_job(i, job, term, leading, views.clone(), client) => {}
                    }
                    views.lock().unwrap_or_else(|e| e.into_inner())[i].next_run = None;
                });
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = leading.changed() => if changed.is_err() { during.cancel(); return },
        }
        during.cancel();
    }
}

async fn run_job(
    i: usize,
    job: JobConfig,
    term: i64,
    leading: watch::Receiver<Option<i64>>,
    views: Arc<Mutex<Vec<JobView>>>,
    client: Client<HttpConnector, Full<Bytes>>,
) {
    let (Ok(schedule), Some(tz)) = (parse_schedule(&job.schedule), parse_offset(&job.timezone)) else {
        return;
    };
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let update = |f: &dyn Fn(&mut JobView)| f(&mut views.lock().unwrap_or_else(|e| e.into_inner())[i]);
    loop {
        let Some(next) = schedule.after(&Utc::now().with_timezone(&tz)).next() else { return };
        update(&|v| v.next_run = Some(next.to_rfc3339()));
        let wait = (next.with_timezone(&Utc) - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        if *leading.borrow() != Some(term) {
            return; // the term ended while we slept
        }
        if job.forbid_overlap && running.load(Ordering::Acquire) {
            tracing::warn!(job = %job.name, scheduled = %next.to_rfc3339(), "job skipped: its previous run is still going");
            update(&|v| v.skipped += 1);
            continue;
        }
        running.store(true, Ordering::Release);
        update(&|v| v.started += 1);
        let (job2, client2, views2, running2) = (job.clone(), client.clone(), views.clone(), running.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = call(&client2, &job2, term, next).await;
            let duration_ms = started.elapsed().as_millis() as u64;
            running2.store(false, Ordering::Release);
            let mut all = views2.lock().unwrap_or_else(|e| e.into_inner());
            let v = &mut all[i];
            let text = match &result {
                Ok(status) => {
                    v.succeeded += 1;
                    tracing::info!(job = %job2.name, term, status, duration_ms, "job run succeeded");
                    format!("succeeded: {status}")
                }
                Err(e) => {
                    v.failed += 1;
                    tracing::warn!(job = %job2.name, term, duration_ms, "job run failed: {e}");
                    format!("failed: {e}")
                }
            };
            v.last_run = Some(RunView { scheduled: next.to_rfc3339(), term, result: text, duration_ms });
        });
    }
}

/// The job's HTTP call; `Ok(status)` for a 2xx answer.
async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    job: &JobConfig,
    term: i64,
    scheduled: DateTime<FixedOffset>,
) -> Result<u16, String> {
    let mut req = http::Request::builder().method(job.method.as_str()).uri(job.url.as_str());
    for (k, v) in &job.headers {
        req = req.header(k, v);
    }
    let req = req
        .header(FENCING_HEADER, term)
        .header("x-outrider-job", job.name.as_str())
        .header("x-outrider-scheduled-at", scheduled.to_rfc3339())
        .body(Full::new(Bytes::from(job.body.clone())))
        .map_err(|e| e.to_string())?;
    let answer = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() { Ok(status.as_u16()) } else { Err(format!("status {status}")) }
    };
    tokio::time::timeout(job.timeout, answer)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", job.timeout)))
}
