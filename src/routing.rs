//! Routing one request: the first rule whose conditions all hold, the side of its split
//! (by weight, or by a sticky key's hash), and the ring-hash key — as a [`Routed`] that the
//! proxy's attempt loop picks with. `/explain` runs the same code on a described request.
//!
//! Owns: matching (headers, path prefix, methods, gRPC service/method) and the split draw.
//! Depends on `config` (the rules) and `upstream` (the pick's `Target`, the key hash); the
//! proxy depends on it. Must not: allocate or lock per request.

use std::net::IpAddr;

use http::{HeaderMap, Method, header};

use crate::config::{Fallback, HashKey, HeaderTest, Match, RetryScope, Route, Routing};
use crate::upstream::{Target, key_hash};

/// What routing decided for one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Routed<'a> {
    /// The rule that matched; `None`: the whole service.
    pub route: Option<&'a Route>,
    pub target: Target,
}

/// The parts of a request routing reads.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's address (the app itself on a loopback listener).
    pub source: Option<IpAddr>,
}

/// Routes `req`: the subset of the first matching rule (the whole service when none does),
/// and the hash of the service's `hash_key` for a ring.
pub fn route<'a>(routing: &'a Routing, req: &Request<'_>) -> Routed<'a> {
    let hash = routing.hash_key.as_ref().and_then(|k| hash_of(k, req));
    let Some(route) = routing.routes.iter().find(|r| matches(&r.matches, req)) else {
        return Routed { route: None, target: Target { subset: 0, hash } };
    };
    let subset = route.split.get(side(route, req)).map_or(0, |s| s.subset);
    Routed { route: Some(route), target: Target { subset, hash } }
}

/// Index of the split entry a request takes: a point on the weight line, from the sticky
/// key's hash when there is one (so growing the last entry's share only moves keys onto
/// it), else random.
fn side(route: &Route, req: &Request<'_>) -> usize {
    if route.split.len() < 2 {
        return 0;
    }
    let total: u64 = route.split.iter().map(|s| u64::from(s.weight)).sum();
    let point = match route.sticky.as_ref().and_then(|k| hash_of(k, req)) {
        Some(h) => h % total,
        None => fastrand::u64(..total),
    };
    let mut upto = 0;
    for (i, s) in route.split.iter().enumerate() {
        upto += u64::from(s.weight);
        if point < upto {
            return i;
        }
    }
    route.split.len() - 1
}

fn matches(m: &Match, req: &Request<'_>) -> bool {
    if !m.methods.is_empty() && !m.methods.contains(req.method) {
        return false;
    }
    if let Some(prefix) = &m.path_prefix
        && !req.path.starts_with(prefix.as_str())
    {
        return false;
    }
    if (m.grpc_service.is_some() || m.grpc_method.is_some()) && !grpc_matches(m, req) {
        return false;
    }
    m.headers.iter().all(|h| {
        let mut values = req.headers.get_all(&h.name).iter();
        match &h.test {
            HeaderTest::Present(present) => values.next().is_some() == *present,
            HeaderTest::Equals(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
            HeaderTest::Regex(p) => values.any(|v| v.to_str().is_ok_and(|s| p.0.is_match(s))),
        }
    })
}

/// A gRPC request (content-type `application/grpc…`) to `/service/method`.
fn grpc_matches(m: &Match, req: &Request<'_>) -> bool {
    let grpc =
        req.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let Some((service, method)) = req.path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    grpc && m.grpc_service.as_ref().is_none_or(|s| s == service)
        && m.grpc_method.as_ref().is_none_or(|x| x == method)
}

/// The hash of a request's key; `None` when the request does not carry it.
fn hash_of(key: &HashKey, req: &Request<'_>) -> Option<u64> {
    match key {
        HashKey::Header(name) => req.headers.get(name).map(|v| key_hash(v.as_bytes())),
        HashKey::Cookie(name) => cookie(req.headers, name).map(|v| key_hash(v.as_bytes())),
        HashKey::Path => Some(key_hash(req.path.as_bytes())),
        HashKey::Source => req.source.map(source_hash),
    }
}

/// The hash of a client's IP address (an IPv4-mapped IPv6 address hashes as IPv4).
pub(crate) fn source_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => key_hash(&v4.octets()),
        IpAddr::V6(v6) => key_hash(&v6.octets()),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

impl Routed<'_> {
    pub(crate) fn fallback(&self) -> Fallback {
        self.route.map_or(Fallback::Service, |r| r.fallback)
    }

    pub(crate) fn retries(&self) -> RetryScope {
        self.route.map_or(RetryScope::Subset, |r| r.retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routing(yaml_routes: &str) -> Routing {
        let yaml = format!(
            "listeners: [{{ name: f, bind: 127.0.0.1:0, service: s }}]\n\
             services:\n  s:\n    endpoints: []\n    routes:\n{yaml_routes}"
        );
        Config::parse(&yaml).unwrap().services["s"].routing.clone()
    }

    fn req<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> Request<'a> {
        Request { method, path, headers, source: None }
    }

    #[test]
    fn first_matching_rule_wins_and_no_match_is_the_whole_service() {
        let r = routing(
            "      - { name: beta, match: { headers: [{ name: x-beta, equals: \"1\" }] }, to: { version: v2 } }\n\
             \x20     - { name: api, match: { path_prefix: /api/, methods: [POST] }, to: { version: v1 } }\n",
        );
        let mut h = HeaderMap::new();
        let post = Method::POST;
        assert_eq!(route(&r, &req(&post, "/api/x", &h)).route.unwrap().name, "api");
        h.insert("x-beta", "1".parse().unwrap());
        let routed = route(&r, &req(&post, "/api/x", &h));
        assert_eq!((routed.route.unwrap().name.as_str(), routed.target.subset), ("beta", 1));
        assert!(route(&r, &req(&Method::GET, "/other", &HeaderMap::new())).route.is_none());
    }

    #[test]
    fn regex_presence_and_grpc_conditions() {
        let r = routing(
            "      - match: { headers: [{ name: x-user, regex: \"^tester-[0-9]+$\" }, { name: x-debug, present: false }] }\n\
             \x20       to: { track: canary }\n\
             \x20     - match: { grpc_service: shop.Cart, grpc_method: Add }\n\
             \x20       to: { version: v2 }\n",
        );
        let mut h = HeaderMap::new();
        h.insert("x-user", "tester-42".parse().unwrap());
        assert_eq!(route(&r, &req(&Method::GET, "/", &h)).route.unwrap().name, "route-0");
        h.insert("x-debug", "on".parse().unwrap());
        assert!(route(&r, &req(&Method::GET, "/", &h)).route.is_none());
        let mut g = HeaderMap::new();
        g.insert(header::CONTENT_TYPE, "application/grpc+proto".parse().unwrap());
        assert_eq!(route(&r, &req(&Method::POST, "/shop.Cart/Add", &g)).route.unwrap().name, "route-1");
        assert!(route(&r, &req(&Method::POST, "/shop.Cart/Remove", &g)).route.is_none());
        assert!(route(&r, &req(&Method::POST, "/shop.Cart/Add", &HeaderMap::new())).route.is_none());
    }

    #[test]
    fn sticky_keys_stay_on_their_side_as_the_canary_grows() {
        let split = |canary: u32| {
            routing(&format!(
                "      - split:\n          - {{ to: {{ version: v1 }}, weight: {} }}\n\
                 \x20         - {{ to: {{ version: v2 }}, weight: {canary} }}\n\
                 \x20       sticky: {{ cookie: session }}\n",
                100 - canary
            ))
        };
        let (five, fifty) = (split(5), split(50));
        let mut on_canary = 0;
        for user in 0..2_000 {
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, format!("theme=dark; session=u{user}").parse().unwrap());
            let at5 = route(&five, &req(&Method::GET, "/", &h)).target.subset;
            assert_eq!(at5, route(&five, &req(&Method::GET, "/", &h)).target.subset, "sticky");
            if at5 == 2 {
                on_canary += 1;
                assert_eq!(
                    route(&fifty, &req(&Method::GET, "/", &h)).target.subset,
                    2,
                    "5% → 50% keeps canary users"
                );
            }
        }
        assert!((60..=140).contains(&on_canary), "about 5% of 2000: {on_canary}");
    }

    #[test]
    fn hash_keys_read_their_part_of_the_request() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "u1".parse().unwrap());
        h.insert(header::COOKIE, "a=1; session=s9".parse().unwrap());
        let r = Request {
            method: &Method::GET,
            path: "/cart/7",
            headers: &h,
            source: Some([10, 0, 0, 7].into()),
        };
        let of = |k: HashKey| hash_of(&k, &r);
        assert_eq!(of(HashKey::Header(http::HeaderName::from_static("x-user"))), Some(key_hash(b"u1")));
        assert_eq!(of(HashKey::Cookie("session".into())), Some(key_hash(b"s9")));
        assert_eq!(of(HashKey::Path), Some(key_hash(b"/cart/7")));
        assert_eq!(of(HashKey::Source), Some(key_hash(&[10, 0, 0, 7])));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(source_hash(mapped), key_hash(&[10, 0, 0, 7]), "IPv4-mapped hashes as IPv4");
        assert_eq!(of(HashKey::Cookie("missing".into())), None, "absent key: no hash (a random pick)");
        assert_eq!(of(HashKey::Header(http::HeaderName::from_static("x-none"))), None);
    }
}
