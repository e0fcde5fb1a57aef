//! The operator's files in `docs/` work with what tailgate exports:
//! - the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`:
//!   each alert fires on the series it is about and stays quiet on the others);
//! - every query of the Grafana dashboard is valid PromQL (checked by promtool as recording
//!   rules, with Grafana's variables filled in);
//! - every `tailgate_*` metric the rules and the dashboard name is one a running tailgate
//!   serves on `/metrics`, or, for labelled families that have no series until their first
//!   event (restarts, drops by reason, backend responses...), one the supervisor registers.
//!
//! promtool ships in Debian's prometheus package, which tests/run.sh installs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| panic!("promtool (Debian's prometheus package): {err}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every query of the dashboard, with Grafana's variables replaced by what they stand for.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(docs().join("grafana/tailgate.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries.push(expr.replace("$__rate_interval", "5m").replace("$instance", ".*"));
        }
    }
    queries
}

/// The `tailgate_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("tailgate_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        // Not part of a longer word (`docs/alerts/tailgate.rules.yml` has no underscore after).
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            names.insert(text[start..end].to_owned());
        }
        at = end;
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = docs().join("alerts");
    let checked = promtool(&["check", "rules", "tailgate.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "tailgate.rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, query) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {}\n",
            serde_json::json!(query)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules).unwrap();
    let checked = promtool(&["check", "rules", "dashboard.rules.yml"], dir.path());
    assert!(checked.contains(&format!("SUCCESS: {} rules found", queries.len())), "{checked}");
}

#[test]
fn rules_and_dashboard_name_only_metrics_tailgate_serves() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let (status, metrics) = http_get(tailgate.telemetry, "/metrics");
    assert_eq!(status, 200);
    // Families are described even before their first sample; counters' samples end in _total.
    let mut served = BTreeSet::new();
    for line in metrics.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            served.insert(name.to_owned());
            if kind == "counter" {
                served.insert(format!("{name}_total"));
            }
        }
    }
    let rules = std::fs::read_to_string(docs().join("alerts/tailgate.rules.yml")).unwrap();
    let rule_exprs: String = rules.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    let mut named = metric_names(&rule_exprs);
    named.extend(dashboard_queries().iter().flat_map(|q| metric_names(q)));
    assert!(named.len() >= 15, "{named:?}");
    // Families without a series yet are not printed; the supervisor's registrations name them
    // (`registry.register("stage_restarts", ...)` is `tailgate_stage_restarts`, a counter's
    // samples `..._total`).
    let telemetry =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/supervisor/src/telemetry.rs")).unwrap();
    let registered = |name: &str| {
        let bare = name.trim_start_matches("tailgate_");
        let family = bare.strip_suffix("_total").unwrap_or(bare);
        telemetry.contains(&format!("\"{family}\","))
    };
    let unknown: Vec<&String> = named.iter().filter(|name| !served.contains(*name) && !registered(name)).collect();
    assert!(unknown.is_empty(), "named in docs/ but neither served nor registered: {unknown:?}\n/metrics:\n{metrics}");
    let live = named.iter().filter(|name| served.contains(*name)).count();
    assert!(live >= 10, "only {live} of the names are served before any event: {named:?}");
}
