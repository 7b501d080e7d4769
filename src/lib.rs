//! Outrider: a sidecar proxy that spreads an app's outbound calls over the instances of
//! upstream services, with client-side load balancing.
//!
//! # Layout
//! - [`config`]: YAML file → validated, typed `Config` (every error with path and line).
//! - [`upstream`]: the live endpoint set of a service and the pickers that choose from it.
//! - [`discovery`]: sources that hand a whole endpoint set to an `upstream::Balancer`.
//! - [`proxy`]: listeners; HTTP (L7) and TCP (L4) forwarding; the upstream HTTP client.
//! - [`admin`]: the dashboard, `/metrics`, probes and introspection, `POST /shutdown`.
//! - [`app`]: wiring, hot reload, graceful shutdown.
//!
//! See ARCHITECTURE.md for the invariants that hold these together.

#![forbid(unsafe_code)]

mod admin;
pub mod app;
mod client;
mod clock;
pub mod config;
pub mod demo;
pub mod discovery;
mod etcd;
pub mod jobs;
pub mod leader;
mod locks;
pub mod overlay_cli;
mod pki;
mod proxy;
mod register;
pub mod routing;
mod server;
pub mod status_cli;
pub mod telemetry;
mod tls;
pub mod upstream;
pub mod watch;
