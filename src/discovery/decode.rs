//! Decoding etcd values into endpoints, whatever wrote them.
//!
//! The format is told by the value's shape: etcd's naming format (`{"Op":0,"Addr":..}`, what
//! grpc-go's `etcd:///` resolver reads), Kratos (`{"endpoints":["http://.."]}`), go-micro
//! (`{"nodes":[{"address":..}]}`), go-kit (a URL) and go-zero (plain `host:port`).
//! Must not: panic or guess — a value it cannot read is an error the caller counts and skips.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;

use serde_json::{Map, Value};

use crate::config::{EndpointSpec, UpstreamProtocol};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("value is not UTF-8")]
    NotUtf8,
    #[error("JSON value of no known shape (expected Addr, endpoints or nodes)")]
    UnknownShape,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("{0:?} is not an IP:port address")]
    Address(String),
    #[error("no endpoint in the value")]
    Empty,
}

/// Endpoints in one value (go-micro may list several nodes). `protocol` chooses among the
/// schemes a Kratos instance advertises (`grpc://` for http2, `http://` for http1).
pub fn decode(value: &[u8], protocol: UpstreamProtocol) -> Result<Vec<EndpointSpec>, DecodeError> {
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::NotUtf8)?.trim();
    if !text.starts_with('{') {
        return Ok(vec![spec(address(text)?, None, BTreeMap::new())].into_iter().flatten().collect());
    }
    let json: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let out = if let Some(addr) = json.get("Addr").and_then(Value::as_str) {
        naming(addr, json.get("Metadata"))?
    } else if let Some(endpoints) = json.get("endpoints").and_then(Value::as_array) {
        kratos(&json, endpoints, protocol)?
    } else if let Some(nodes) = json.get("nodes").and_then(Value::as_array) {
        micro(nodes)?
    } else {
        return Err(DecodeError::UnknownShape);
    };
    Ok(out)
}

/// etcd naming: `Metadata` may carry `weight`, `tags` (a map) and other scalar fields
/// (version, zone) that become tags.
fn naming(addr: &str, metadata: Option<&Value>) -> Result<Vec<EndpointSpec>, DecodeError> {
    let addr = address(addr)?;
    let mut tags = BTreeMap::new();
    let mut weight = None;
    if let Some(Value::Object(m)) = metadata {
        for (k, v) in m {
            match (k.as_str(), v) {
                ("weight", v) => weight = weight_of(v),
                ("tags", Value::Object(t)) => {
                    tags.extend(t.iter().filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v))))
                }
                (k, v) => tags.extend(scalar(v).map(|v| (k.to_string(), v))),
            }
        }
    }
    Ok(spec(addr, weight, tags).into_iter().collect())
}

fn kratos(
    json: &Map<String, Value>,
    endpoints: &[Value],
    protocol: UpstreamProtocol,
) -> Result<Vec<EndpointSpec>, DecodeError> {
    let urls: Vec<&str> = endpoints.iter().filter_map(Value::as_str).collect();
    let preferred = match protocol {
        UpstreamProtocol::Http2 | UpstreamProtocol::Auto => ["grpc://", "http://"],
        UpstreamProtocol::Http1 => ["http://", "grpc://"],
    };
    let url = preferred
        .iter()
        .find_map(|p| urls.iter().find(|u| u.starts_with(p)))
        .or(urls.first())
        .ok_or(DecodeError::Empty)?;
    let mut tags = string_map(json.get("metadata"));
    if let Some(v) = json.get("version").and_then(scalar).filter(|v| !v.is_empty()) {
        tags.insert("version".into(), v);
    }
    let weight = tags.get("weight").and_then(|w| w.parse().ok());
    Ok(spec(address(url)?, weight, tags).into_iter().collect())
}

fn micro(nodes: &[Value]) -> Result<Vec<EndpointSpec>, DecodeError> {
    let mut out = Vec::new();
    for node in nodes {
        let addr = node.get("address").and_then(Value::as_str).ok_or(DecodeError::Empty)?;
        let tags = string_map(node.get("metadata"));
        let weight = tags.get("weight").and_then(|w| w.parse().ok());
        out.extend(spec(address(addr)?, weight, tags));
    }
    if out.is_empty() { Err(DecodeError::Empty) } else { Ok(out) }
}

/// `host:port`, or a URL (`scheme://host:port/path`) whose host is an IP.
fn address(text: &str) -> Result<SocketAddr, DecodeError> {
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or_default();
    hostport.parse().map_err(|_| DecodeError::Address(text.to_string()))
}

/// Weight 0 means "drained": the instance is listed but takes no traffic, so it is left out.
fn spec(addr: SocketAddr, weight: Option<u64>, tags: BTreeMap<String, String>) -> Option<EndpointSpec> {
    let weight = match weight {
        None => NonZeroU32::MIN,
        Some(w) => NonZeroU32::new(w.min(u64::from(crate::config::defaults::MAX_WEIGHT)) as u32)?,
    };
    Some(EndpointSpec { addr, weight, tags })
}

fn weight_of(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    match v {
        Some(Value::Object(m)) => m.iter().filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v))).collect(),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(value: &str) -> EndpointSpec {
        let mut all = decode(value.as_bytes(), UpstreamProtocol::Http1).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    #[test]
    fn etcd_naming_format_with_metadata() {
        let e = one(
            r#"{"Op":0,"Addr":"10.1.2.3:8080","Metadata":{"weight":100,"version":"v2","zone":"a","tags":{"track":"canary"}}}"#,
        );
        assert_eq!(e.addr.to_string(), "10.1.2.3:8080");
        assert_eq!(e.weight.get(), 100);
        assert_eq!(e.tags["version"], "v2");
        assert_eq!(e.tags["zone"], "a");
        assert_eq!(e.tags["track"], "canary");
    }

    #[test]
    fn go_zero_plain_address_and_go_kit_url() {
        assert_eq!(one("10.0.0.1:9000").addr.to_string(), "10.0.0.1:9000");
        assert_eq!(one(" http://10.0.0.2:80/api/v1\n").addr.to_string(), "10.0.0.2:80");
    }

    #[test]
    fn kratos_prefers_the_scheme_of_the_upstream_protocol() {
        let v = r#"{"id":"x","name":"pay","version":"v3","metadata":{"weight":"7"},"endpoints":["grpc://10.0.0.3:9000","http://10.0.0.3:8000"]}"#;
        let h1 = decode(v.as_bytes(), UpstreamProtocol::Http1).unwrap();
        let h2 = decode(v.as_bytes(), UpstreamProtocol::Http2).unwrap();
        assert_eq!(h1[0].addr.port(), 8000);
        assert_eq!(h2[0].addr.port(), 9000);
        assert_eq!(h1[0].weight.get(), 7);
        assert_eq!(h1[0].tags["version"], "v3");
    }

    #[test]
    fn go_micro_lists_every_node() {
        let v = r#"{"name":"pay","nodes":[{"id":"a","address":"10.0.0.4:80","metadata":{"zone":"b"}},{"id":"b","address":"10.0.0.5:80"}]}"#;
        let all = decode(v.as_bytes(), UpstreamProtocol::Http1).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].tags["zone"], "b");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in ["", "not an address", "{", r#"{"foo":1}"#, r#"{"Addr":"db.internal:5432"}"#, "\u{0}\u{1}"]
        {
            assert!(decode(bad.as_bytes(), UpstreamProtocol::Http1).is_err(), "{bad:?} decoded");
        }
        assert_eq!(decode(&[0xff, 0xfe], UpstreamProtocol::Http1), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn weight_zero_means_drained() {
        let all =
            decode(br#"{"Addr":"10.0.0.6:80","Metadata":{"weight":0}}"#, UpstreamProtocol::Http1).unwrap();
        assert!(all.is_empty());
    }
}
