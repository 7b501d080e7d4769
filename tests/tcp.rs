//! L4 proxying: byte echo with half-close, and prompt close on connect failure.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads until EOF, then writes back everything it read, then closes: only works if the
/// proxy forwards the client's half-close (FIN) and keeps the other direction open.
async fn echo_after_eof() -> std::net::SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                s.read_to_end(&mut data).await.unwrap();
                s.write_all(&data).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_echo_with_half_close() {
    let upstream = echo_after_eof().await;
    let app = start_app(&one_service("tcp", "", &[(upstream, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut conn = within(TcpStream::connect(front)).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    conn.write_all(&payload).await.unwrap();
    conn.shutdown().await.unwrap(); // half-close: we are done writing, still reading
    let mut back = Vec::new();
    within(conn.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
}

#[tokio::test]
async fn tcp_connect_failure_closes_the_client_promptly() {
    let app = start_app(&one_service("tcp", "", &[(refused_addr(), 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut conn = within(TcpStream::connect(front)).await.unwrap();
    let mut buf = [0u8; 16];
    // `within` bounds this: a proxy that kept the socket open would hang here.
    let n = within(conn.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "expected the proxy to close the connection");
}

#[tokio::test]
async fn tcp_least_request_counts_open_connections() {
    let (a, b) = (echo_after_eof().await, echo_after_eof().await);
    let extra = "    load_balancing: least_request\n";
    let app = start_app(&one_service("tcp", extra, &[(a, 1), (b, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(b"x").await.unwrap(); // proves the splice is up before the next connect
        open.push(c);
        // Wait until the proxy counts this connection before opening the next.
        let want = open.len();
        within(async {
            loop {
                let total: usize = in_flight(&app).iter().sum();
                if total == want {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    assert_eq!(in_flight(&app), vec![2, 2], "open connections spread evenly");
}

fn in_flight(app: &outrider::app::App) -> Vec<usize> {
    app.balancer("svc").unwrap().describe().iter().map(|e| e.in_flight).collect()
}
