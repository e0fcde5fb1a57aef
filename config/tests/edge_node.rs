//! `docs/edge-node.yaml`, the annotated configuration for an edge node, is valid: with its
//! environment set and its certificate and secret files in place it parses and passes every
//! check, and it means what its comments say.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::path::Path;

use tailgate_config::{Config, ConfigError};

#[test]
fn the_edge_node_example_is_a_valid_configuration() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/edge-node.yaml")).unwrap();
    // The host's files, in a directory of the test's own.
    let etc = std::env::temp_dir().join(format!("tailgate-edge-node-{}", std::process::id()));
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    for pem in ["tls/home-ca.pem", "tls/edge.pem", "tls/edge.key"] {
        std::fs::write(etc.join(pem), "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
    }
    for secret in ["loki.token", "prom.pass"] {
        std::fs::write(etc.join(secret), "s3cret\n").unwrap();
    }
    let text = text.replace("/etc/tailgate/", &format!("{}/", etc.display()));
    let env = |name: &str| match name {
        "BACKEND_HOST" => Some("home.example.net".to_owned()),
        "SITE" => Some("store-0042".to_owned()),
        _ => None,
    };
    let config = Config::parse_with_env(&text, &env).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.exporters.traces.otlp.endpoint, "https://home.example.net:4317");
    let loki = config.exporters.logs.as_ref().and_then(|logs| logs.loki.as_ref()).unwrap();
    assert_eq!(loki.tenant_id.as_deref(), Some("store-0042"));
    assert_eq!(config.tail_sample.policies.len(), 5);
    assert!(config.receivers.filelog.is_some());
    // Without its environment it is refused with the variable named.
    let Err(ConfigError::Invalid(problems)) = Config::parse_with_env(&text, &|_| None) else { panic!("accepted") };
    assert!(problems.iter().any(|p| p.message.contains("BACKEND_HOST is not set")), "{problems:?}");
    let _ = std::fs::remove_dir_all(&etc);
}
