//! Leader election across three real Outrider processes and a real etcd: exactly one leader,
//! `/leader` agreeing everywhere, hand-over on SIGTERM within a second, and a new leader
//! after the leader's SIGKILL within the TTL plus a second.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::etcd::Etcd;
use support::*;

const TTL_SECS: u64 = 2;

fn config(etcd: &Etcd, admin: SocketAddr, name: &str) -> String {
    format!(
        "admin:\n  bind: {admin}\nshutdown:\n  drain_window: 0s\n  grace_period: 1s\nallow_no_listeners: true\nlisteners: []\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         leader:\n  election: reports\n  ttl: {TTL_SECS}s\n  identity: {name}\n",
        etcd.url
    )
}

/// The same, with a job every second calling `app` (each instance's own local app).
fn with_job(etcd: &Etcd, admin: SocketAddr, name: &str, app: SocketAddr) -> String {
    config(etcd, admin, name)
        + &format!(
            "jobs:\n  - name: tick\n    schedule: \"* * * * * *\"\n    url: http://{app}/tick\n    headers: {{ x-instance: {name} }}\n    timeout: 2s\n"
        )
}

/// Every job call the apps received: (scheduled-at, fencing token, instance).
type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, i64, String)>>>;

async fn recording_app(calls: Calls) -> Backend {
    Backend::start(move |req: http::Request<hyper::body::Incoming>| {
        let h = |k: &str| req.headers().get(k).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        calls.lock().unwrap().push((
            h("x-outrider-scheduled-at"),
            h("x-outrider-fencing-token").parse().unwrap(),
            h("x-instance"),
        ));
        async { text(200, "done") }
    })
    .await
}

async fn view(admin: SocketAddr) -> serde_json::Value {
    let (status, _, body) = get(&client(), &format!("http://{admin}/leader")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The indices of the instances that say they lead, and the terms they report.
async fn leaders(admins: &[SocketAddr]) -> Vec<(usize, i64)> {
    let mut out = Vec::new();
    for (i, a) in admins.iter().enumerate() {
        let v = view(*a).await;
        if v["leader"] == true {
            out.push((i, v["term"].as_i64().unwrap()));
        }
    }
    out
}

/// Waits until exactly one of `alive` leads; which one, its term, and how long that took.
async fn one_leader(admins: &[SocketAddr], alive: &[usize]) -> (usize, i64, Duration) {
    let started = Instant::now();
    within(async {
        loop {
            let live: Vec<SocketAddr> = alive.iter().map(|i| admins[*i]).collect();
            if let [(i, term)] = leaders(&live).await[..] {
                return (alive[i], term, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_hands_over_on_sigterm_and_is_replaced_after_a_crash() {
    let etcd = Etcd::start().await;
    let admins: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut procs: Vec<Option<Binary>> = Vec::new();
    for (i, admin) in admins.iter().enumerate() {
        let mut p = Binary::spawn(&config(&etcd, *admin, &format!("app-{i}")));
        p.logged("outrider started").await;
        procs.push(Some(p));
    }
    let (first, term1, _) = one_leader(&admins, &[0, 1, 2]).await;
    // Sampled: never two leaders at once, and every instance names the same election.
    for _ in 0..20 {
        assert!(leaders(&admins).await.len() <= 1, "two leaders at once");
    }
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", admins[first])).await;
    assert!(metrics.contains("outrider_leader{election=\"outrider/election/reports\"} 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("outrider_leader_term{{election=\"outrider/election/reports\"}} {term1}")),
        "{metrics}"
    );
    assert!(metrics.contains("outrider_leadership_changes_total 1"), "{metrics}");

    // SIGTERM: the leader resigns first; another leads within a second.
    let sent = Instant::now();
    procs[first].as_ref().unwrap().sigterm();
    let rest: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let (second, term2, _) = one_leader(&admins, &rest).await;
    let handover = sent.elapsed();
    assert!(term2 > term1, "the fencing token grows: {term1} then {term2}");
    assert!(handover < Duration::from_secs(1), "hand-over took {handover:?}");
    assert_eq!(procs[first].take().unwrap().exit_code().await, Some(0));

    // SIGKILL: no resignation; the lease's end frees the election.
    let killed = Instant::now();
    procs[second].as_mut().unwrap().crash();
    let last: Vec<usize> = rest.iter().copied().filter(|i| *i != second).collect();
    let (_, term3, _) = one_leader(&admins, &last).await;
    let failover = killed.elapsed();
    assert!(term3 > term2);
    assert!(failover < Duration::from_secs(TTL_SECS + 1), "failover took {failover:?}");
    println!(
        "leader hand-over on SIGTERM: {handover:?}; failover after SIGKILL (ttl {TTL_SECS}s): {failover:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_every_second_runs_each_tick_exactly_once_across_a_failover() {
    let etcd = Etcd::start().await;
    let calls: Calls = Default::default();
    let admins: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut apps = Vec::new();
    let mut procs: Vec<Option<Binary>> = Vec::new();
    for (i, admin) in admins.iter().enumerate() {
        let app = recording_app(calls.clone()).await;
        let mut p = Binary::spawn(&with_job(&etcd, *admin, &format!("app-{i}"), app.addr));
        p.logged("outrider started").await;
        procs.push(Some(p));
        apps.push(app);
    }
    let (first, term1, _) = one_leader(&admins, &[0, 1, 2]).await;
    // The job's ticks arrive in wall-clock seconds: wait for several.
    within(async {
        while calls.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_, _, body) = get(&client(), &format!("http://{}/jobs", admins[first])).await;
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(jobs["jobs"][0]["succeeded"].as_u64().unwrap() >= 4, "{jobs}");
    assert!(jobs["jobs"][0]["next_run"].is_string(), "the leader knows its next run: {jobs}");

    procs[first].as_mut().unwrap().crash();
    let rest: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let (second, term2, _) = one_leader(&admins, &rest).await;
    let before = calls.lock().unwrap().len();
    within(async {
        while calls.lock().unwrap().len() < before + 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let mut ticks: Vec<&String> = calls.iter().map(|(at, _, _)| at).collect();
    let total = ticks.len();
    ticks.sort();
    ticks.dedup();
    println!("job ticks received: {total}, distinct: {}, across a failover", ticks.len());
    assert_eq!(ticks.len(), total, "a tick ran twice: {calls:?}");
    for (_, token, instance) in &calls {
        let expected = if *instance == format!("app-{first}") { term1 } else { term2 };
        assert_eq!(*token, expected, "each call carries its leader's fencing token");
        assert!(
            *instance == format!("app-{first}") || *instance == format!("app-{second}"),
            "only leaders run jobs"
        );
    }
}

async fn lock_call(admin: SocketAddr, method: &str, name: &str, query: &str) -> (u16, serde_json::Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}/locks/{name}?{query}"))
        .body(empty())
        .unwrap();
    let resp = within(client().request(req)).await.unwrap();
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_exclude_each_other_with_growing_fencing_tokens_and_a_dead_holders_lock_frees() {
    let etcd = Etcd::start().await;
    let admins: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut procs = Vec::new();
    for (i, admin) in admins.iter().enumerate() {
        let mut p = Binary::spawn(&config(&etcd, *admin, &format!("app-{i}")));
        p.logged("outrider started").await;
        procs.push(p);
    }
    // Three apps, each through its own sidecar, take the same lock ten times each.
    let sections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut apps = tokio::task::JoinSet::new();
    for admin in admins.clone() {
        let sections = sections.clone();
        apps.spawn(async move {
            for _ in 0..10 {
                let (status, granted) = lock_call(admin, "POST", "ledger", "ttl=5s&wait=20s").await;
                assert_eq!(status, 200, "{granted}");
                let entered = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await; // the critical section
                let left = Instant::now();
                sections.lock().unwrap().push((entered, left, granted["token"].as_i64().unwrap()));
                assert_eq!(lock_call(admin, "DELETE", "ledger", "").await.0, 200);
            }
        });
    }
    while let Some(done) = within(apps.join_next()).await {
        done.unwrap();
    }
    let mut sections = sections.lock().unwrap().clone();
    sections.sort_by_key(|s| s.0);
    assert_eq!(sections.len(), 30);
    for pair in sections.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two holders at once");
        assert!(pair[1].2 > pair[0].2, "fencing tokens grow: {} then {}", pair[0].2, pair[1].2);
    }

    // Held elsewhere: a try-once acquisition is refused.
    let (status, held) = lock_call(admins[0], "POST", "ledger", "ttl=2s").await;
    assert_eq!(status, 200, "{held}");
    assert_eq!(lock_call(admins[1], "POST", "ledger", "ttl=2s").await.0, 409);
    // The holder's sidecar dies: the lock frees when its 2 s lease ends.
    procs[0].crash();
    let killed = Instant::now();
    let (status, next) = lock_call(admins[1], "POST", "ledger", "ttl=2s&wait=10s").await;
    let freed = killed.elapsed();
    assert_eq!(status, 200, "{next}");
    assert!(next["token"].as_i64() > held["token"].as_i64());
    assert!(freed < Duration::from_secs(3), "a dead holder's lock freed after {freed:?}");
    println!("lock of a SIGKILLed holder (ttl 2s) free after {freed:?}");
}
