//! `outrider demo`: the quickstart config plus a tiny HTTP instance on each of its static
//! endpoints, so a new user sees calls spread over several instances with one command.
//!
//! Owns: the demo instances only. Must not: be used by anything but the `demo` command.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{Config, DiscoveryConfig};

/// The shipped quickstart file, embedded so the demo needs no path.
pub const QUICKSTART: &str = include_str!("../config/quickstart.yaml");

/// Starts one demo instance on every static endpoint of `config`.
pub async fn start_instances(config: &Config) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for svc in config.services.values() {
        let DiscoveryConfig::Static { endpoints } = &svc.discovery else {
            continue;
        };
        for e in endpoints {
            let socket = TcpListener::bind(e.addr).await?;
            tokio::spawn(instance(socket, e.addr));
            addrs.push(e.addr);
        }
    }
    Ok(addrs)
}

async fn instance(socket: TcpListener, addr: SocketAddr) {
    while let Ok((stream, _)) = socket.accept().await {
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
            let body = format!("hello from demo instance {addr}: {} {}\n", req.method(), req.uri());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
