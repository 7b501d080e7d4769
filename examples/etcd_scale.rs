//! What watchers cost one etcd, measured against a real etcd on loopback (the figures in
//! docs/etcd-scaling.md):
//!
//! - put → the last of N watchers of one prefix sees it, N = 10, 100, 1000, with the N
//!   watches multiplexed on one client (as one Outrider holds all its watches) and with N
//!   clients (N sidecars, one connection each);
//! - etcd's resident memory per 100 watchers, and its connections;
//! - the re-list storm after an etcd restart with 1000 followers: retrying at once vs
//!   Outrider's rule (jittered backoff, ended early by a TCP probe every 250-500 ms).
//!
//! Run: `cargo run --release --example etcd_scale` (needs `etcd` on the PATH).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, WatchOptions};
use tokio::sync::Notify;

const PREFIX: &str = "bench/svc/";

struct Etcd {
    url: String,
    ports: (u16, u16),
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    fn start() -> Etcd {
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ports = (port(), port());
        let mut e = Etcd {
            url: format!("http://127.0.0.1:{}", ports.0),
            ports,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.ports.1);
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(self.dir.path())
            .args(["--listen-client-urls", &self.url, "--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd on the PATH");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.ports.0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident memory of the etcd process, KiB.
    fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One round's count of watchers that saw the put, and a wake-up when all have.
struct Round {
    seen: AtomicUsize,
    all: Notify,
}

/// Opens `n` watches on PREFIX, over one client (`shared`) or one client each; returns the
/// round tracker once every watch is established.
async fn watchers(url: &str, n: usize, shared: bool, round: Arc<Round>) -> Vec<tokio::task::JoinHandle<()>> {
    let one = Client::connect([url], None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut client = if shared { one.clone() } else { Client::connect([url], None).await.unwrap() };
        let mut stream = client.watch(PREFIX, Some(WatchOptions::new().with_prefix())).await.unwrap();
        let round = round.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = client;
            while let Ok(Some(resp)) = stream.message().await {
                if !resp.events().is_empty() && round.seen.fetch_add(1, Ordering::AcqRel) + 1 == n {
                    round.all.notify_one();
                }
            }
        }));
    }
    tasks
}

async fn fan_out(etcd: &Etcd, n: usize, shared: bool) {
    let before = etcd.rss_kib();
    let round = Arc::new(Round { seen: AtomicUsize::new(0), all: Notify::new() });
    let tasks = watchers(&etcd.url, n, shared, round.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = etcd.rss_kib();
    let mut kv = Client::connect([etcd.url.as_str()], None).await.unwrap();
    let mut lat = Vec::new();
    for i in 0..20 {
        round.seen.store(0, Ordering::Release);
        let started = Instant::now();
        let wait = round.all.notified();
        kv.put(format!("{PREFIX}10.0.0.{i}:80"), "x", None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), wait).await.expect("every watcher saw the put");
        lat.push(started.elapsed());
    }
    lat.sort();
    let per100 = (after.saturating_sub(before)) as f64 * 100.0 / n as f64;
    println!(
        "N={n:5} {:9} connections={:5}  put->last watcher p50 {:7.2} ms  max {:7.2} ms   etcd RSS +{:.0} KiB per 100 watchers",
        if shared { "one-conn" } else { "conn-each" },
        if shared { 1 } else { n },
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
        per100,
    );
    for t in tasks {
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// `n` followers (one client each) re-list after an etcd restart; prints how re-lists spread.
async fn storm(etcd: &mut Etcd, n: usize, jittered: bool) {
    let relists = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let addr = format!("127.0.0.1:{}", etcd.ports.0);
    let mut tasks = Vec::new();
    let ready = Arc::new(AtomicUsize::new(0));
    for _ in 0..n {
        let (url, addr, relists, ready) = (etcd.url.clone(), addr.clone(), relists.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            loop {
                // Lists and watches until the watch fails.
                let result = async {
                    let mut c = Client::connect([url.as_str()], None).await?;
                    c.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
                    if first {
                        ready.fetch_add(1, Ordering::Release);
                    } else {
                        relists.lock().unwrap().push(Instant::now());
                    }
                    first = false;
                    let mut s = c.watch(PREFIX, Some(WatchOptions::new().with_prefix())).await?;
                    while s.message().await?.is_some() {}
                    Ok::<_, etcd_client::Error>(())
                }
                .await;
                let _ = result;
                if jittered {
                    // Outrider's rule: probe TCP every 250-500 ms; retry when it connects.
                    loop {
                        let wait = Duration::from_millis(250 + fastrand::u64(0..250));
                        tokio::time::sleep(wait).await;
                        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                            break;
                        }
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    while ready.load(Ordering::Acquire) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = Instant::now();
    etcd.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relists.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = relists.lock().unwrap().clone();
    let mut windows = std::collections::BTreeMap::<u128, usize>::new();
    for t in &times {
        *windows.entry(t.duration_since(restarted).as_millis() / 100).or_default() += 1;
    }
    let peak = windows.values().max().copied().unwrap_or(0);
    let last = times.iter().map(|t| t.duration_since(restarted)).max().unwrap_or_default();
    println!(
        "storm N={n} {:14}: {} of {n} re-listed, all within {:.2} s of the restart, peak {peak} re-lists per 100 ms",
        if jittered { "outrider-rule" } else { "retry-at-once" },
        times.len(),
        last.as_secs_f64(),
    );
    for t in tasks {
        t.abort();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::main]
async fn main() {
    let mut etcd = Etcd::start();
    println!("etcd RSS idle: {} KiB", etcd.rss_kib());
    for n in [10, 100, 1000] {
        fan_out(&etcd, n, true).await;
        fan_out(&etcd, n, false).await;
    }
    storm(&mut etcd, 1000, false).await;
    storm(&mut etcd, 1000, true).await;
}
