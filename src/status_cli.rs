//! `outrider status`: a running Outrider's services and endpoints as a compact table, read
//! from its admin API's `/dashboard.json` (the dashboard's own data), in the spirit of
//! `linkerd viz stat`. Colour only on a terminal (and not with `NO_COLOR`).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Reads the overview from the admin API at `admin` (host:port, or a URL).
pub async fn fetch(admin: &str) -> anyhow::Result<Value> {
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{admin}")
    };
    let uri: http::Uri =
        format!("{base}/dashboard.json").parse().with_context(|| format!("{admin:?} is not host:port"))?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let fetch = async {
        let resp = client.get(uri.clone()).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "{uri} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
        serde_json::from_slice(&body)
            .with_context(|| format!("{uri} did not answer JSON (is it an Outrider admin port?)"))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("no answer from {uri} within 5s"))?
        .with_context(|| format!("cannot read the admin API at {base}"))
}

/// What `--json` prints: the overview without the charts' series.
pub fn for_scripts(mut overview: Value) -> Value {
    if let Some(services) = overview["services"].as_array_mut() {
        for s in services {
            if let Some(obj) = s.as_object_mut() {
                obj.remove("chart");
            }
        }
    }
    overview
}

/// The overview as text tables: one line per service, then each service's endpoints.
pub fn render(overview: &Value, colour: bool) -> String {
    let paint = |text: String, code: Option<&str>| match code {
        Some(code) if colour => Paint { text, code: Some(code.to_string()) },
        _ => Paint { text, code: None },
    };
    let mut out = String::new();
    let reloads = &overview["reloads"];
    let reload = if reloads["last_failed"].as_bool() == Some(true) {
        format!("last reload FAILED: {}", reloads["last_error"].as_str().unwrap_or("?"))
    } else {
        "last reload ok".to_string()
    };
    let ready = if overview["ready"].as_bool() == Some(true) { "ready" } else { "NOT READY" };
    let _ = writeln!(
        out,
        "outrider {} · config generation {} · {reload} · {ready}",
        str_of(&overview["version"]),
        overview["generation"]
    );
    let services = overview["services"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut rows = vec![
        [
            "SERVICE",
            "BALANCING",
            "DISCOVERY",
            "BREAKER",
            "ENDPOINTS",
            "RPS",
            "SUCCESS",
            "P50",
            "P99",
            "RETRIES/S",
        ]
        .map(|h| paint(h.to_string(), None))
        .to_vec(),
    ];
    for s in services {
        let r = &s["rates"];
        let endpoints = s["endpoints"].as_array().map(Vec::as_slice).unwrap_or_default();
        let active = endpoints.iter().filter(|e| e["state"] == "active").count();
        let breaker = str_of(&s["circuit_breaker"]);
        let breaker_code = match breaker.as_str() {
            "open" => Some(RED),
            "half_open" => Some(YELLOW),
            _ => None,
        };
        let total = endpoints.len() + s["endpoints_omitted"].as_u64().unwrap_or(0) as usize;
        let ep_code = (active < total).then_some(YELLOW);
        rows.push(vec![
            paint(str_of(&s["name"]), None),
            paint(str_of(&s["load_balancing"]), None),
            paint(discovery(&s["discovery"]), None),
            paint(breaker, breaker_code),
            paint(format!("{active}/{total} active"), ep_code),
            paint(fixed(&r["rps"], 1), None),
            paint(percent(&r["success_rate"]), success_code(&r["success_rate"])),
            paint(millis(&r["p50_ms"]), None),
            paint(millis(&r["p99_ms"]), None),
            paint(fixed(&r["retries_per_s"], 1), None),
        ]);
    }
    table(&mut out, &rows);
    for s in services {
        let _ = writeln!(out, "\n{}", str_of(&s["name"]));
        let mut rows = vec![
            ["  ENDPOINT", "STATE", "WEIGHT", "SHARE", "IN-FLIGHT", "RPS", "ERRORS", "LATENCY"]
                .map(|h| paint(h.to_string(), None))
                .to_vec(),
        ];
        for e in s["endpoints"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let state = str_of(&e["state"]);
            let code = match state.as_str() {
                "active" => Some(GREEN),
                "probing" => Some(YELLOW),
                "draining" => Some(DIM),
                _ => Some(RED),
            };
            let r = &e["rates"];
            rows.push(vec![
                paint(format!("  {}", str_of(&e["addr"])), None),
                paint(state, code),
                paint(e["weight"].to_string(), None),
                paint(percent(&e["share"]), None),
                paint(e["in_flight"].to_string(), None),
                paint(fixed(&r["rps"], 1), None),
                paint(percent(&r["error_rate"]), None),
                paint(millis(&r["mean_ms"]), None),
            ]);
        }
        table(&mut out, &rows);
        if let Some(n) = s["endpoints_omitted"].as_u64().filter(|n| *n > 0) {
            let _ = writeln!(out, "  ({n} more endpoints not listed)");
        }
    }
    out
}

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const DIM: &str = "2";

#[derive(Clone)]
struct Paint {
    text: String,
    code: Option<String>,
}

/// Left-aligned columns two spaces apart, padded on the visible text (colour codes aside).
fn table(out: &mut String, rows: &[Vec<Paint>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|p| p.text.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.text.chars().count());
            match &cell.code {
                Some(code) => {
                    let _ = write!(line, "\x1b[{code}m{}\x1b[0m", cell.text);
                }
                None => line.push_str(&cell.text),
            }
            if c + 1 < row.len() {
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn fixed(v: &Value, digits: usize) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

fn percent(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{:.2}%", x * 100.0))
}

fn millis(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.2}ms"))
}

fn success_code(v: &Value) -> Option<&'static str> {
    match v.as_f64() {
        Some(x) if x < 0.95 => Some(RED),
        Some(x) if x < 0.99 => Some(YELLOW),
        _ => None,
    }
}

fn discovery(d: &Value) -> String {
    match d["kind"].as_str() {
        Some("etcd") => format!("etcd {} r{}", str_of(&d["state"]), d["revision"]),
        Some("dns") => format!("dns {} answers", d["answers"]),
        Some(kind) => kind.to_string(),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_visible_text_and_colour_only_when_asked() {
        let overview = serde_json::json!({
            "version": "0.1.0", "generation": 3, "ready": true,
            "reloads": { "last_failed": true, "last_error": "bad yaml" },
            "services": [{
                "name": "svc", "load_balancing": "least_request", "circuit_breaker": "open",
                "discovery": { "kind": "static" }, "endpoints_omitted": 0,
                "rates": { "rps": 12.345, "success_rate": 0.9, "p50_ms": 1.5, "p99_ms": null, "retries_per_s": 0.0 },
                "endpoints": [
                    { "addr": "127.0.0.1:1", "state": "active", "weight": 1, "share": 1.0, "in_flight": 0,
                      "rates": { "rps": 12.3, "error_rate": 0.1, "mean_ms": 1.25 } },
                    { "addr": "127.0.0.1:2", "state": "ejected", "weight": 1, "share": 0.0, "in_flight": 0,
                      "rates": {} }
                ]
            }]
        });
        let plain = render(&overview, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(plain.contains("last reload FAILED: bad yaml"), "{plain}");
        assert!(
            plain.contains("1/2 active") && plain.contains("90.00%") && plain.contains("12.3"),
            "{plain}"
        );
        let lines: Vec<&str> = plain.lines().filter(|l| l.contains("127.0.0.1:")).collect();
        assert_eq!(lines[0].find("active"), lines[1].find("ejected"), "columns align:\n{plain}");
        let coloured = render(&overview, true);
        assert!(coloured.contains("\x1b[31mejected\x1b[0m") && coloured.contains("\x1b[31mopen\x1b[0m"));
    }
}
