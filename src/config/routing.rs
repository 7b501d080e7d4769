//! Validation of a service's routing: `routes` (matches → subsets by endpoint tags, weighted
//! splits, sticky keys, fallbacks), `hash_key` for `ring_hash`, and `locality` with the
//! top-level `zone` block.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use http::{HeaderName, Method};
use serde::{Serialize, Serializer};

use super::file::{HashKeyFile, HeaderMatchFile, MatchFile, RouteFile, ZoneFile};
use super::locate::join_key;
use super::validate::{Validator, defaults, valid_name};
use super::{Locality, Policy};

/// A subset of a service's endpoints: those whose tags include every entry.
pub type Selector = BTreeMap<String, String>;

/// How a service's requests reach subsets of its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Routing {
    /// Tried in order; the first whose `matches` all hold decides. No match: the whole service.
    pub routes: Vec<Route>,
    /// The subsets routes send to, by index; index 0 is the whole service (empty selector).
    pub subsets: Vec<Selector>,
    /// What `load_balancing: ring_hash` hashes.
    pub hash_key: Option<HashKey>,
    /// Same-zone preference (`locality: prefer_local` with the top-level `zone`).
    pub locality: Option<LocalityRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: Match,
    /// Subsets and their weights (one entry for `to`); a request takes one of them.
    pub split: Vec<Share>,
    /// Hash this key to choose the side of the split, so one user stays on one side.
    pub sticky: Option<HashKey>,
    pub fallback: Fallback,
    pub retries: RetryScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Share {
    pub subset: usize,
    pub weight: u32,
}

/// Where a request goes when its subset has no routable endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Every endpoint of the service.
    Service,
    /// 503 `no_subset_endpoints`.
    Fail,
    /// Another subset (503 `no_subset_endpoints` when that one is empty too).
    Subset(usize),
}

/// Which endpoints a retry may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryScope {
    /// The subset the request was routed to (or its fallback).
    Subset,
    /// Any endpoint of the service.
    Service,
}

/// Every condition present must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Match {
    pub headers: Vec<HeaderMatch>,
    pub path_prefix: Option<String>,
    #[serde(serialize_with = "displayed")]
    pub methods: Vec<Method>,
    /// The `service` and `method` of a gRPC request's `/service/method` path.
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "displayed_one")]
    pub name: HeaderName,
    pub test: HeaderTest,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderTest {
    Equals(String),
    /// `true`: the header is there (any value); `false`: it is not.
    Present(bool),
    Regex(Pattern),
}

/// A compiled regular expression (regex-lite: linear time in the value's length).
#[derive(Debug, Clone)]
pub struct Pattern(pub regex_lite::Regex);

/// The request attribute hashed for `ring_hash` or a sticky split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(#[serde(serialize_with = "displayed_one")] HeaderName),
    Cookie(String),
    Path,
    /// The client's IP address.
    Source,
}

/// Prefer endpoints in this Outrider's zone (see `upstream::locality` for the rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalityRule {
    pub zone: String,
    /// The endpoint tag that holds an endpoint's zone.
    pub tag: String,
    /// Below this many endpoints in the (sub)set, zones are ignored.
    pub min_endpoints: usize,
}

/// The top-level `zone` block, validated.
#[derive(Debug, Clone, Default)]
pub(super) struct Zone {
    name: Option<String>,
    tag: String,
    min_endpoints: usize,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

fn displayed<S: Serializer, T: fmt::Display>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}

fn displayed_one<S: Serializer, T: fmt::Display>(item: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(item)
}

/// Longest regex source accepted in a header match (compiled size is bounded too).
const MAX_PATTERN: usize = 1024;
const MAX_ROUTES: usize = 64;
const MAX_SPLIT: usize = 16;
const MAX_SPLIT_WEIGHT: u32 = 10_000;

impl Validator {
    pub(super) fn zone(&mut self, z: Option<ZoneFile>) -> Zone {
        let z = z.unwrap_or_default();
        let name = z.name.filter(|n| !n.trim().is_empty());
        let tag = z.tag.unwrap_or_else(|| defaults::ZONE_TAG.into());
        if tag.is_empty() {
            self.problem("zone.tag", "must name the endpoint tag that holds a zone");
        }
        let min = z.min_endpoints.unwrap_or(defaults::ZONE_MIN_ENDPOINTS);
        if !(1..=10_000).contains(&min) {
            self.problem("zone.min_endpoints", format!("must be between 1 and 10000, got {min}"));
        }
        Zone { name, tag, min_endpoints: min as usize }
    }

    /// The service's `routes`, `hash_key` and `locality`, checked against its policy.
    pub(super) fn routing(
        &mut self,
        path: &str,
        routes: Option<Vec<RouteFile>>,
        hash_key: Option<HashKeyFile>,
        locality: Locality,
        policy: Policy,
        zone: &Zone,
    ) -> Routing {
        let mut subsets = vec![Selector::new()];
        let routes = routes.unwrap_or_default();
        if routes.len() > MAX_ROUTES {
            self.problem(
                &join_key(path, "routes"),
                format!("at most {MAX_ROUTES} routes, got {}", routes.len()),
            );
        }
        let mut names = HashSet::new();
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let rp = format!("{}[{i}]", join_key(path, "routes"));
                let route = self.route(&rp, i, r, &mut subsets);
                if !names.insert(route.name.clone()) {
                    self.problem(
                        &join_key(&rp, "name"),
                        format!("route name {:?} is used twice", route.name),
                    );
                }
                route
            })
            .collect();
        let hash_key = hash_key.map(|k| self.hash_key(&join_key(path, "hash_key"), k));
        match (policy, &hash_key) {
            (Policy::RingHash, None) => self.problem(
                &join_key(path, "load_balancing"),
                "ring_hash needs a `hash_key` (header, cookie, path or source)",
            ),
            (Policy::RingHash, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                self.problem(&join_key(path, "hash_key"), "`hash_key` is for `load_balancing: ring_hash`")
            }
        }
        let locality = match locality {
            Locality::Any => None,
            Locality::PreferLocal => {
                let lp = join_key(path, "locality");
                if policy == Policy::RingHash {
                    let msg = "not with ring_hash: a key must map to the same endpoint from every zone";
                    self.problem(&lp, msg);
                }
                match &zone.name {
                    Some(name) => Some(LocalityRule {
                        zone: name.clone(),
                        tag: zone.tag.clone(),
                        min_endpoints: zone.min_endpoints,
                    }),
                    None => {
                        let msg = "prefer_local needs this Outrider's zone: set the top-level `zone.name` \
                                   (e.g. ${ZONE} from the downward API)";
                        self.problem(&lp, msg);
                        None
                    }
                }
            }
        };
        Routing { routes, subsets, hash_key, locality }
    }

    fn route(&mut self, path: &str, i: usize, r: RouteFile, subsets: &mut Vec<Selector>) -> Route {
        let p = |k| join_key(path, k);
        let name = r.name.unwrap_or_else(|| format!("route-{i}"));
        if !valid_name(&name) {
            self.problem(&p("name"), format!("{name:?}: use ASCII letters, digits, '.', '_' or '-'"));
        }
        let mut subset = |sel: BTreeMap<String, String>| match subsets.iter().position(|s| *s == sel) {
            Some(i) => i,
            None => {
                subsets.push(sel);
                subsets.len() - 1
            }
        };
        let split = match (r.to, r.split) {
            (Some(to), None) => vec![Share { subset: subset(to), weight: 1 }],
            (None, Some(list)) => {
                if list.is_empty() || list.len() > MAX_SPLIT {
                    self.problem(&p("split"), format!("needs 1 to {MAX_SPLIT} entries, got {}", list.len()));
                }
                let shares: Vec<Share> = list
                    .into_iter()
                    .enumerate()
                    .map(|(j, s)| {
                        let weight = u32::try_from(s.weight).ok().filter(|w| *w <= MAX_SPLIT_WEIGHT);
                        if weight.is_none() {
                            self.problem(
                                &format!("{}[{j}].weight", p("split")),
                                format!("must be between 0 and {MAX_SPLIT_WEIGHT}, got {}", s.weight),
                            );
                        }
                        Share { subset: subset(s.to), weight: weight.unwrap_or(0) }
                    })
                    .collect();
                if !shares.is_empty() && shares.iter().all(|s| s.weight == 0) {
                    self.problem(&p("split"), "every weight is 0: at least one side must get traffic");
                }
                shares
            }
            (Some(_), Some(_)) => {
                self.problem(path, "give `to` (one subset) or `split` (weighted subsets), not both");
                Vec::new()
            }
            (None, None) => {
                self.problem(path, "a route needs `to` (a subset by tags) or `split`");
                Vec::new()
            }
        };
        let sticky = r.sticky.map(|k| self.hash_key(&p("sticky"), k));
        if sticky.is_some() && split.len() < 2 {
            self.problem(&p("sticky"), "sticky chooses a side of a `split`; this route has one subset");
        }
        let fallback = match (r.fallback.as_deref(), r.fallback_to) {
            (None | Some("service"), None) => Fallback::Service,
            (Some("fail"), None) => Fallback::Fail,
            (None | Some("subset"), Some(to)) => Fallback::Subset(subset(to)),
            (Some("subset"), None) => {
                self.problem(&p("fallback"), "`fallback: subset` needs `fallback_to` (the subset's tags)");
                Fallback::Fail
            }
            (Some(f @ ("service" | "fail")), Some(_)) => {
                self.problem(&p("fallback_to"), format!("`fallback_to` is for `fallback: subset`, not {f}"));
                Fallback::Fail
            }
            (Some(other), _) => {
                self.problem(&p("fallback"), format!("{other:?}: use service, fail or subset"));
                Fallback::Service
            }
        };
        let retries = match r.retries.as_deref() {
            None | Some("subset") => RetryScope::Subset,
            Some("service") => RetryScope::Service,
            Some(other) => {
                self.problem(&p("retries"), format!("{other:?}: use subset or service"));
                RetryScope::Subset
            }
        };
        let matches = self.matches(&p("match"), r.matches);
        Route { name, matches, split, sticky, fallback, retries }
    }

    fn matches(&mut self, path: &str, m: MatchFile) -> Match {
        let p = |k| join_key(path, k);
        let headers = m
            .headers
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, h)| self.header_match(&format!("{}[{i}]", p("headers")), h))
            .collect();
        if let Some(prefix) = &m.path_prefix
            && !prefix.starts_with('/')
        {
            self.problem(&p("path_prefix"), format!("{prefix:?} must start with '/'"));
        }
        let methods = m
            .methods
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, text)| match Method::from_bytes(text.as_bytes()) {
                Ok(m) if text.bytes().all(|b| b.is_ascii_uppercase()) => Some(m),
                _ => {
                    self.problem(
                        &format!("{}[{i}]", p("methods")),
                        format!("{text:?} is not a method (GET, POST, ...)"),
                    );
                    None
                }
            })
            .collect();
        for (key, part) in [("grpc_service", &m.grpc_service), ("grpc_method", &m.grpc_method)] {
            if let Some(part) = part
                && (part.is_empty() || part.contains('/'))
            {
                self.problem(&p(key), format!("{part:?}: one part of the /service/method path, without '/'"));
            }
        }
        Match {
            headers,
            path_prefix: m.path_prefix,
            methods,
            grpc_service: m.grpc_service,
            grpc_method: m.grpc_method,
        }
    }

    fn header_match(&mut self, path: &str, h: HeaderMatchFile) -> Option<HeaderMatch> {
        let name = match HeaderName::from_bytes(h.name.as_bytes()) {
            Ok(n) => n,
            Err(_) => {
                self.problem(&join_key(path, "name"), format!("{:?} is not a header name", h.name));
                return None;
            }
        };
        let test = match (h.equals, h.present, h.regex) {
            (Some(v), None, None) => HeaderTest::Equals(v),
            (None, Some(b), None) => HeaderTest::Present(b),
            (None, None, Some(re)) => {
                let rp = join_key(path, "regex");
                if re.len() > MAX_PATTERN {
                    self.problem(&rp, format!("longer than {MAX_PATTERN} characters"));
                    return None;
                }
                match regex_lite::RegexBuilder::new(&re).size_limit(1 << 20).build() {
                    Ok(r) => HeaderTest::Regex(Pattern(r)),
                    Err(e) => {
                        self.problem(&rp, format!("not a regular expression: {e}"));
                        return None;
                    }
                }
            }
            _ => {
                self.problem(path, "give exactly one of `equals`, `present` or `regex`");
                return None;
            }
        };
        Some(HeaderMatch { name, test })
    }

    fn hash_key(&mut self, path: &str, k: HashKeyFile) -> HashKey {
        let key = match (k.header, k.cookie, k.path, k.source) {
            (Some(h), None, None, None) => HeaderName::from_bytes(h.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("{h:?} is not a header name")),
            (None, Some(c), None, None) if !c.is_empty() && !c.contains([';', '=', ' ']) => {
                Ok(HashKey::Cookie(c))
            }
            (None, Some(c), None, None) => Err(format!("{c:?} is not a cookie name")),
            (None, None, Some(true), None) => Ok(HashKey::Path),
            (None, None, None, Some(true)) => Ok(HashKey::Source),
            _ => Err("give exactly one of `header`, `cookie`, `path: true` or `source: true`".to_string()),
        };
        key.unwrap_or_else(|msg| {
            self.problem(path, msg);
            HashKey::Path
        })
    }
}
