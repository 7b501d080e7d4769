//! Config: shipped files stay valid; each class of mistake names its YAML path and line;
//! `outrider check` exit codes.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use outrider::config::{Config, ConfigError, Problem};

mod support;

fn problems(yaml: &str) -> Vec<Problem> {
    match Config::parse_with_env(yaml, HashMap::new()) {
        Ok(_) => panic!("config unexpectedly valid:\n{yaml}"),
        Err(ConfigError::Invalid(p)) => p,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Asserts one problem at `path` on `line` whose message contains `needle`.
fn assert_problem(all: &[Problem], path: &str, line: usize, needle: &str) {
    let found =
        all.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no problem at {path}: {all:#?}"));
    assert_eq!(found.pos.map(|p| p.line), Some(line), "{found}");
    assert!(found.message.contains(needle), "{found}");
}

/// Where shipped configs expect TLS files (a Kubernetes TLS Secret's keys): the tests put
/// certificates generated now in their place.
const TLS_DIR: &str = "/etc/outrider/tls/";

/// A temp dir holding `ca.crt`, `tls.crt` and `tls.key`, as a mounted TLS Secret would.
fn tls_secret() -> support::tls::Ca {
    let ca = support::tls::Ca::new("shipped");
    let leaf = ca.leaf("leaf", &["checkout.shop.svc", "spiffe://cluster.local/ns/shop/sa/checkout"]);
    std::fs::copy(&ca.cert, ca.path("ca.crt")).unwrap();
    std::fs::copy(&leaf.cert, ca.path("tls.crt")).unwrap();
    std::fs::copy(&leaf.key, ca.path("tls.key")).unwrap();
    ca
}

/// Loads `text` as a config file, with its TLS files pointing at `secret`.
fn load_with_secret(text: &str, secret: &support::tls::Ca) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    let mounted = format!("{}/", secret.dir.path().display());
    std::fs::write(&path, text.replace(TLS_DIR, &mounted)).unwrap();
    Config::load(&path)
}

#[test]
fn every_shipped_config_file_is_valid() {
    // config/*.yaml, and the Outrider configs (outrider*.yaml) that deploy/ and k8s/ ship.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let secret = tls_secret();
    let mut checked = Vec::new();
    for dir in ["config", "deploy", "k8s"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let ours = dir == "config" || name.starts_with("outrider");
            if ours && name.ends_with(".yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                load_with_secret(&text, &secret).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked.push(format!("{dir}/{name}"));
            }
        }
    }
    for expected in [
        "config/reference.yaml",
        "config/quickstart.yaml",
        "k8s/outrider.yaml",
        "k8s/outrider-mtls.yaml",
        "deploy/outrider.yaml",
    ] {
        assert!(checked.iter().any(|c| c == expected), "{expected} not checked: {checked:?}");
    }
}

/// The README's pasteable TLS/mTLS config is valid as printed.
#[test]
fn the_readme_tls_config_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## TLS and mTLS").expect("README has a TLS section")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    assert!(block.contains(TLS_DIR), "{block}");
    let config = load_with_secret(block, &tls_secret()).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert!(config.listeners.iter().any(|l| l.tls.is_some()));
    assert!(config.services.values().any(|s| s.tls.is_some()));
}

#[test]
fn embedded_quickstart_matches_the_shipped_file() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/quickstart.yaml")).unwrap();
    assert_eq!(outrider::demo::QUICKSTART, shipped);
}

const BASE: &str = "\
listeners:
  - name: front
    bind: 127.0.0.1:7001
    service: payments
services:
  payments:
    endpoints:
      - addr: 127.0.0.1:8080
";

#[test]
fn semantic_mistakes_are_all_reported_with_path_and_line() {
    let yaml = "\
admin:
  bind: 127.0.0.1:7001
shutdown:
  drain_window: soon
listeners:
  - name: front
    bind: 127.0.0.1:7001
    service: payments
  - name: front
    bind: 127.0.0.1:7002
    service: billing
services:
  payments:
    endpoints:
      - addr: 127.0.0.1:8080
        weight: 0
      - addr: db:http
      - addr: 127.0.0.1:8080
    timeouts:
      request: 2h
";
    let all = problems(yaml);
    assert_problem(&all, "shutdown.drain_window", 4, "not a duration");
    assert_problem(&all, "listeners[0].bind", 7, "port 7001 is already used by admin.bind");
    assert_problem(&all, "listeners[1].name", 9, "duplicate listener name");
    assert_problem(&all, "listeners[1].service", 11, "unknown service \"billing\"");
    assert_problem(&all, "services.payments.endpoints[0].weight", 16, "between 1 and 65535, got 0");
    assert_problem(&all, "services.payments.endpoints[1].addr", 17, "not an address: IP:port or host:port");
    assert_problem(&all, "services.payments.endpoints[2].addr", 18, "duplicate endpoint");
    assert_problem(&all, "services.payments.timeouts.request", 20, "out of range");
    assert_eq!(all.len(), 8, "{all:#?}");
}

#[test]
fn unknown_field_names_its_path_and_line() {
    let yaml = BASE.replace("    service: payments\n", "    service: payments\n    colour: blue\n");
    let all = problems(&yaml);
    assert_problem(&all, "listeners[0].colour", 5, "unknown field `colour`");
}

#[test]
fn wrong_enum_value_names_its_path_and_line() {
    let yaml = format!("{BASE}    load_balancing: random\n");
    let all = problems(&yaml);
    assert_problem(&all, "services.payments.load_balancing", 9, "random");
}

#[test]
fn wrong_type_names_its_path_and_line() {
    let yaml = BASE
        .replace("      - addr: 127.0.0.1:8080\n", "      - addr: 127.0.0.1:8080\n        weight: heavy\n");
    let all = problems(&yaml);
    assert_problem(&all, "services.payments.endpoints[0].weight", 9, "");
}

#[test]
fn yaml_syntax_error_names_its_line() {
    let all = problems("services:\n  payments: [unclosed\n");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].pos.map(|p| p.line), Some(2), "{}", all[0]);
}

#[test]
fn environment_variables_expand_with_defaults() {
    let yaml = BASE.replace("127.0.0.1:7001", "${BIND_IP:-127.0.0.1}:${PORT}");
    let env = HashMap::from([("PORT".to_string(), "7100".to_string())]);
    let config = Config::parse_with_env(&yaml, env).unwrap();
    assert_eq!(config.listeners[0].bind.to_string(), "127.0.0.1:7100");
    let all = problems(&yaml);
    assert_problem(&all, "listeners[0].bind", 3, "PORT is not set");
}

#[test]
fn hash_ignores_comments_and_formatting() {
    let a = Config::parse_with_env(BASE, HashMap::new()).unwrap();
    let b = Config::parse_with_env(&format!("# a comment\n{BASE}\n\n"), HashMap::new()).unwrap();
    assert_eq!(a.hash(), b.hash());
    let c = Config::parse_with_env(&BASE.replace("8080", "8081"), HashMap::new()).unwrap();
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn check_command_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_outrider");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, BASE).unwrap();
    let out = Command::new(bin).arg("check").arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).expect("effective config is JSON");
    assert_eq!(effective["services"]["payments"]["timeouts"]["connect"], "1s");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, BASE.replace("8080", "99999")).unwrap();
    let out = Command::new(bin).arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("services.payments.endpoints[0].addr (line 8"), "{stderr}");

    let out = Command::new(bin).arg("check").arg(dir.path().join("missing.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(bin).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2 (clap)");
}

#[test]
fn an_empty_or_comment_only_file_is_refused() {
    for text in ["", "\n\n", "# only a comment\n", "---\n", "~\n", "{}\n"] {
        let all = problems(text);
        assert_eq!(all.len(), 1, "{text:?}: {all:#?}");
        assert!(all[0].message.contains("no settings"), "{text:?}: {}", all[0]);
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrider")).arg("check").arg(&empty).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "`check` must refuse an empty file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no settings"));
}

#[test]
fn a_config_without_listeners_is_refused_unless_allowed() {
    // What a reader sees of a file cut off before its listeners.
    let truncated = "admin:\n  bind: 127.0.0.1:9901\nshutdown:\n  drain_window: 5s\n";
    let all = problems(truncated);
    assert_problem(&all, "listeners", 1, "no listeners");
    let all = problems(&format!("{truncated}listeners: []\nservices: {{}}\n"));
    assert_problem(&all, "listeners", 5, "allow_no_listeners");
    let allowed = format!("{truncated}allow_no_listeners: true\n");
    let config = Config::parse_with_env(&allowed, HashMap::new()).unwrap();
    assert!(config.listeners.is_empty() && config.allow_no_listeners);
}

#[test]
fn a_changed_etcd_password_changes_the_hash() {
    let with = |password: &str| {
        let yaml = format!(
            "{BASE}etcd:\n  endpoints: [http://127.0.0.1:2379]\n  username: app\n  password: {password}\n"
        );
        Config::parse_with_env(&yaml, HashMap::new()).unwrap()
    };
    let (old, new) = (with("old-secret"), with("new-secret"));
    assert_eq!(old.to_json(), new.to_json(), "the password is redacted in the effective config");
    assert_ne!(old.hash(), new.hash(), "rotating the password must be a reload, not a no-op");
}

#[test]
fn inbound_limits_have_the_documented_defaults_and_ranges() {
    let config = Config::parse_with_env(BASE, HashMap::new()).unwrap();
    let l = &config.listeners[0].limits;
    assert_eq!(
        (
            l.max_connections,
            l.header_read_timeout.as_secs(),
            l.idle_timeout.as_secs(),
            l.max_header_bytes,
            l.max_headers
        ),
        (10_000, 10, 300, 61_440, 100)
    );
    let a = &config.admin.limits;
    assert_eq!((a.max_connections, a.max_header_bytes, a.max_headers), (128, 16_384, 100));
    let yaml = BASE.replace(
        "    service: payments\n",
        "    service: payments\n    limits: { max_connections: 0, header_read_timeout: 1h, max_header_bytes: 10, max_headers: 5000 }\n",
    );
    let all = problems(&yaml);
    assert_problem(&all, "listeners[0].limits.max_connections", 5, "between 1 and 1000000");
    assert_problem(&all, "listeners[0].limits.header_read_timeout", 5, "out of range");
    assert_problem(&all, "listeners[0].limits.max_header_bytes", 5, "between 1024 and 1048576");
    assert_problem(&all, "listeners[0].limits.max_headers", 5, "between 1 and 1000");
}

#[test]
fn allowed_networks_are_cidrs_and_only_for_discovered_endpoints() {
    let yaml =
        format!("allowed_networks: [10.0.0.0/8, not-a-net]\n{BASE}    allowed_networks: [10.0.0.0/8]\n");
    let all = problems(&yaml);
    assert_problem(&all, "allowed_networks[1]", 1, "not a CIDR");
    assert_problem(&all, "services.payments.allowed_networks", 10, "static ones are listed here");
}

#[test]
fn dns_discovery_mistakes_name_their_path_and_line() {
    let yaml = "\
dns:
  servers: [10.96.0.10, 10.96.0.11:5353, dns.local]
  min_refresh: 10s
  max_refresh: 5s
listeners:
  - name: front
    bind: 127.0.0.1:7001
    service: a
services:
  a:
    discovery: dns
    dns:
      name: payments.prod.svc.cluster.local
  b:
    discovery: dns
    dns:
      srv: _grpc._tcp.payments
      weight: 3
  c:
    discovery: dns
    dns:
      name: bad name
      port: 0
  d:
    dns:
      name: x
      port: 1
    endpoints: []
  e:
    discovery: dns
  f:
    endpoints:
      - addr: payments:8080
      - addr: PAYMENTS:8080
";
    let all = problems(yaml);
    assert_problem(&all, "dns.servers[2]", 2, "not a name server address");
    assert_problem(&all, "dns.max_refresh", 4, "must not be below min_refresh");
    assert_problem(&all, "services.a.dns.port", 12, "a `name` needs a `port`");
    assert_problem(&all, "services.b.dns.weight", 18, "SRV records carry their own weights");
    assert_problem(&all, "services.c.dns.name", 22, "not a DNS name");
    assert_problem(&all, "services.c.dns.port", 23, "between 1 and 65535");
    assert_problem(&all, "services.d.dns", 25, "needs `discovery: dns`");
    assert_problem(&all, "services.e.dns", 29, "needs a `dns` block");
    assert_problem(&all, "services.f.endpoints[1].addr", 34, "duplicate endpoint");
    assert_eq!(all.len(), 9, "{all:#?}");
}

#[test]
fn host_names_in_endpoints_are_resolved_by_dns_with_the_documented_defaults() {
    let yaml = format!("{BASE}      - addr: payments.prod.svc.cluster.local:8080\n        weight: 2\n");
    let config = Config::parse_with_env(&yaml, HashMap::new()).unwrap();
    let d = &config.dns;
    assert_eq!(d.resolv_conf, std::path::Path::new("/etc/resolv.conf"));
    assert!(d.servers.is_empty());
    assert_eq!(
        (d.timeout, d.min_refresh, d.max_refresh),
        (Duration::from_secs(2), Duration::from_secs(1), Duration::from_secs(30))
    );
    let outrider::config::DiscoveryConfig::Dns { names, fixed, allowed_networks } =
        &config.services["payments"].discovery
    else {
        panic!("a host name makes the list DNS-resolved");
    };
    assert_eq!(fixed.len(), 1);
    assert!(allowed_networks.is_empty());
    assert_eq!(names[0].query.to_string(), "payments.prod.svc.cluster.local:8080");
    assert_eq!(names[0].weight.get(), 2);

    let unreadable = yaml.replace("services:", "dns:\n  resolv_conf: /nonexistent/resolv.conf\nservices:");
    assert_problem(&problems(&unreadable), "dns.resolv_conf", 6, "cannot read /nonexistent/resolv.conf");
}

#[test]
fn an_empty_overlay_prefix_is_refused_and_overlays_validate_like_the_file() {
    let yaml = format!("etcd:\n  endpoints: [127.0.0.1:2379]\n  overlay_prefix: \"\"\n{BASE}");
    assert_problem(&problems(&yaml), "etcd.overlay_prefix", 3, "empty prefix");

    let config = Config::parse_with_env(BASE, HashMap::new()).unwrap();
    let overlay = |text: &str| outrider::config::Overlay {
        service: "payments".into(),
        key: "outrider/overlay/payments".into(),
        text: text.into(),
    };
    let layered = config
        .with_overlays(&[overlay("weights: {\"127.0.0.1:8080\": 0}\nretries: {max_attempts: 3}\n")])
        .unwrap();
    let svc = &layered.services["payments"];
    assert_eq!(svc.weights.values().copied().collect::<Vec<_>>(), [0]);
    assert_eq!(svc.resilience.retries.max_attempts, 3);
    assert_eq!(svc.resilience.retries.budget, config.services["payments"].resilience.retries.budget);

    let all = config.with_overlays(&[overlay("weights:\n  10.0.0.1:80: -1\n  nowhere: 1\n")]).unwrap_err();
    let text: Vec<_> = all.iter().map(ToString::to_string).collect();
    assert!(
        text[0].starts_with("etcd key outrider/overlay/payments: weights.10.0.0.1:80 (line 2"),
        "{text:?}"
    );
    assert!(text[0].contains("between 0 (drain) and 65535"), "{text:?}");
    assert!(text[1].contains("weights.nowhere") && text[1].contains("not an endpoint address"), "{text:?}");
}

#[test]
fn routing_mistakes_name_their_path_and_line() {
    let yaml = "\
listeners:
  - name: front
    bind: 127.0.0.1:7001
    service: a
services:
  a:
    endpoints: []
    load_balancing: ring_hash
    locality: prefer_local
    routes:
      - name: both
        to: { version: v2 }
        split: [{ to: { version: v1 }, weight: 1 }]
      - match:
          headers:
            - { name: x-user, regex: \"([a-z\" }
            - { name: x-a, equals: \"1\", present: true }
          path_prefix: api
          methods: [get]
        to: { version: v2 }
        fallback: elsewhere
      - split:
          - { to: { version: v1 }, weight: 0 }
          - { to: { version: v2 }, weight: 0 }
        retries: everywhere
      - to: { version: v3 }
        sticky: { header: x-user }
        fallback: subset
  b:
    endpoints: []
    hash_key: { header: x-user, cookie: session }
";
    let all = problems(yaml);
    assert_problem(&all, "services.a.load_balancing", 8, "ring_hash needs a `hash_key`");
    assert_problem(&all, "services.a.locality", 9, "not with ring_hash");
    assert_problem(&all, "services.a.routes[0]", 11, "not both");
    assert_problem(&all, "services.a.routes[1].match.headers[0].regex", 16, "not a regular expression");
    assert_problem(&all, "services.a.routes[1].match.headers[1]", 17, "exactly one of");
    assert_problem(&all, "services.a.routes[1].match.path_prefix", 18, "must start with '/'");
    assert_problem(&all, "services.a.routes[1].match.methods[0]", 19, "not a method");
    assert_problem(&all, "services.a.routes[1].fallback", 21, "use service, fail or subset");
    assert_problem(&all, "services.a.routes[2].split", 22, "every weight is 0");
    assert_problem(&all, "services.a.routes[2].retries", 25, "use subset or service");
    assert_problem(&all, "services.a.routes[3].sticky", 27, "this route has one subset");
    assert_problem(&all, "services.a.routes[3].fallback", 28, "needs `fallback_to`");
    assert_problem(&all, "services.b.hash_key", 31, "exactly one of");
    assert!(all.iter().any(|p| p.message.contains("zone.name")), "prefer_local without a zone: {all:#?}");
    assert_eq!(all.len(), 15, "{all:#?}"); // b: also a hash_key without ring_hash
}

#[test]
fn routing_defaults_are_the_documented_ones() {
    let yaml = "\
zone:
  name: eu-west-1a
listeners:
  - { name: front, bind: 127.0.0.1:7001, service: a }
services:
  a:
    endpoints: []
    locality: prefer_local
    routes:
      - to: { version: v2 }
";
    let config = Config::parse_with_env(yaml, HashMap::new()).unwrap();
    let routing = &config.services["a"].routing;
    let rule = routing.locality.as_ref().unwrap();
    assert_eq!((rule.zone.as_str(), rule.tag.as_str(), rule.min_endpoints), ("eu-west-1a", "zone", 6));
    let route = &routing.routes[0];
    assert_eq!(route.name, "route-0");
    assert_eq!(route.fallback, outrider::config::Fallback::Service);
    assert_eq!(route.retries, outrider::config::RetryScope::Subset);
    assert!(route.sticky.is_none());
    assert_eq!(config.services["a"].load_balancing, outrider::config::Policy::WeightedRoundRobin);
}

#[test]
fn slow_start_has_documented_defaults_and_ranges() {
    let yaml = "\
listeners:
  - { name: front, bind: 127.0.0.1:7001, service: a }
services:
  a:
    endpoints: []
    slow_start: {}
  b:
    endpoints: []
    load_balancing: ring_hash
    hash_key: { path: true }
    slow_start:
      window: 0s
      floor_percent: 0
      aggression: 50
";
    let all = problems(yaml);
    assert_problem(&all, "services.b.slow_start", 11, "not with ring_hash");
    assert_problem(&all, "services.b.slow_start.window", 12, "out of range");
    assert_problem(&all, "services.b.slow_start.floor_percent", 13, "between 1 and 100");
    assert_problem(&all, "services.b.slow_start.aggression", 14, "between 0.1 and 10");
    assert_eq!(all.len(), 4, "{all:#?}");
    let ok = yaml.split("  b:").next().unwrap();
    let config = Config::parse_with_env(ok, HashMap::new()).unwrap();
    let s = config.services["a"].slow_start.clone().unwrap();
    assert_eq!((s.window, s.floor, s.aggression), (Duration::from_secs(30), 0.1, 1.0));
}

#[test]
fn client_weighted_has_grpc_defaults_and_belongs_to_its_policy() {
    let yaml = "\
listeners:
  - { name: front, bind: 127.0.0.1:7001, service: a }
services:
  a:
    endpoints: []
    load_balancing: client_weighted
  b:
    endpoints: []
    client_weighted: { blackout: 1s }
  c:
    endpoints: []
    load_balancing: client_weighted
    client_weighted: { update_period: 1ms, error_penalty: -1 }
";
    let all = problems(yaml);
    assert_problem(&all, "services.b.client_weighted", 9, "is for `load_balancing: client_weighted`");
    assert_problem(&all, "services.c.client_weighted.update_period", 13, "out of range");
    assert_problem(&all, "services.c.client_weighted.error_penalty", 13, "between 0 and 100");
    assert_eq!(all.len(), 3, "{all:#?}");
    let ok = yaml.split("  b:").next().unwrap();
    let cw = Config::parse_with_env(ok, HashMap::new()).unwrap().services["a"].client_weighted.unwrap();
    let want = (Duration::from_secs(10), Duration::from_secs(180), Duration::from_secs(1), 1.0);
    assert_eq!((cw.blackout, cw.expiration, cw.update_period, cw.error_penalty), want);
}

#[test]
fn leader_election_needs_etcd_and_a_name() {
    let yaml = "\
allow_no_listeners: true
listeners: []
leader:
  ttl: 1s
";
    let all = problems(yaml);
    assert_problem(&all, "leader.election", 3, "name the election");
    assert_problem(&all, "leader.ttl", 4, "out of range");
    assert!(all.iter().any(|p| p.message.contains("needs the top-level `etcd` block")), "{all:#?}");
}

#[test]
fn job_mistakes_name_their_path_and_line() {
    let yaml = "\
allow_no_listeners: true
listeners: []
jobs:
  - name: a
    schedule: every day
    timezone: Europe/Berlin
    url: https://app/x
    concurrency: sometimes
  - name: b
    schedule: 0 3 * * *
    url: http://127.0.0.1:8080/b
";
    let all = problems(yaml);
    assert_problem(&all, "jobs[0].schedule", 5, "not a cron schedule");
    assert_problem(&all, "jobs[0].timezone", 6, "UTC or a fixed offset");
    assert_problem(&all, "jobs[0].url", 7, "http:// URL");
    assert_problem(&all, "jobs[0].concurrency", 8, "forbid or allow");
    assert_problem(&all, "jobs", 3, "need the `leader` block");
    assert_eq!(all.len(), 5, "{all:#?}");
}
