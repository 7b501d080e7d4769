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
