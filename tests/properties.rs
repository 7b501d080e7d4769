//! Property tests: any input gives an answer, never a panic — for the config loader, the
//! registry value decoder, and request heads sent to a real listener. Case counts are kept
//! small for CI (`PROPTEST_CASES` raises them for a longer run).

mod support;

use std::collections::HashMap;

use outrider::config::Config;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VALID: &str = "\
admin: { bind: 127.0.0.1:0 }
listeners:
  - name: front
    bind: 127.0.0.1:0
    service: svc
services:
  svc:
    load_balancing: least_request
    retries: { max_attempts: 3, retry_on: [reset, 503] }
    endpoints:
      - { addr: 127.0.0.1:8080, weight: 2, tags: { zone: a } }
      - addr: 127.0.0.1:8081
";

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_config_or_an_error(text in "\\PC{0,400}") {
        let _ = Config::parse_with_env(&text, HashMap::new());
    }

    #[test]
    fn any_yaml_like_text_is_a_config_or_an_error(text in "([a-z_]{1,8}: ?|  |- |\\{|\\}|\\[|\\]|, |[0-9.:]{1,12}|\\$\\{[A-Z]{1,3}(:-x)?\\}|\n|#|'|\"|&a |\\*a){0,80}") {
        let _ = Config::parse_with_env(&text, HashMap::new());
    }

    #[test]
    fn any_cut_or_edit_of_a_valid_config_is_a_config_or_an_error(
        cut in 0..VALID.len(),
        at in 0..VALID.len(),
        byte in any::<u8>(),
    ) {
        let mut bytes = VALID.as_bytes().to_vec();
        bytes[at] = byte;
        bytes.truncate(cut.max(1));
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(config) = Config::parse_with_env(&text, HashMap::new()) {
            prop_assert!(!config.listeners.is_empty(), "a config that proxies nothing was accepted");
        }
    }

    #[test]
    fn any_registry_value_decodes_or_errs(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = outrider::discovery::decode::decode(&value, Default::default());
    }

    #[test]
    fn any_json_shaped_registry_value_decodes_or_errs(
        value in "\\{(\"(Op|Addr|Metadata|weight|endpoints|nodes|address|id)\":( ?[0-9]{1,6}|\"[a-z0-9.:/]{0,24}\"|\\[\\]|\\{\\}|null|true),?){0,6}\\}"
    ) {
        let _ = outrider::discovery::decode::decode(value.as_bytes(), Default::default());
    }
}

/// Request heads of random shape, sent raw to a real listener: each gets a status line (or
/// the connection closes), and the listener keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_heads_never_break_the_listener() {
    let backend = Backend::named("ok").await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let head = "(GET|POST|PUT|PRI|[A-Z]{1,8}) (/[a-z0-9%?=&]{0,20}|\\*|http://x/) HTTP/1\\.[01]\r\n\
                (([A-Za-z-]{1,12}|Transfer-Encoding|Content-Length|Connection|Upgrade|TE|Expect): ?\
                ([ -~]{0,30}|chunked|identity, chunked|close|keep-alive|100-continue|-1|99999999999)\r\n){0,8}\r\n\
                ([0-9a-f]{1,3}\r\n[a-z]{0,5}\r\n)?";
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 200, ..ProptestConfig::default() });
    let strategy = proptest::string::string_regex(head).unwrap();
    let mut answered = 0;
    for _ in 0..200 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        let mut conn = tokio::net::TcpStream::connect(front).await.unwrap();
        conn.write_all(text.as_bytes()).await.unwrap();
        let _ = conn.shutdown().await; // nothing more will come: the server must answer or close
        let mut reply = Vec::new();
        within(conn.read_to_end(&mut reply)).await.unwrap_or_default();
        if reply.is_empty() {
            continue;
        }
        if text.starts_with("PRI ") {
            // The method reserved for the HTTP/2 preface: the HTTP/2 server answers with
            // frames (its SETTINGS, then a GOAWAY for the broken preface).
            assert!(reply.len() >= 9 && reply[3] == 0x4, "{text:?} -> {reply:?}");
            continue;
        }
        let line = String::from_utf8_lossy(&reply);
        assert!(line.starts_with("HTTP/1."), "no status line for {text:?}: {line:?}");
        let status: u16 = line[9..12].parse().unwrap_or(0);
        assert!((100..600).contains(&status), "{text:?} -> {line:?}");
        answered += 1;
    }
    assert!(answered > 50, "only {answered} of 200 heads got an answer");
    let (status, _, body) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!((status, body.as_str()), (200, "ok"), "the listener keeps serving");
}
