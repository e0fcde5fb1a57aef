//! `tailgate demo --json` as a newcomer runs it, shortened, with an outage of the sinks and a
//! SIGKILL of tail_sample on the way: about 80% of spans and log lines stay on the node, every
//! exemplar resolves, the span metrics count every span, nothing is lost or duplicated. The
//! demo's ground truth is checked independently from the log file it wrote (a trace must be
//! kept iff one of its lines is at ERROR or its root lasted over 200 ms).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

#[test]
fn a_short_demo_reports_the_cut_and_no_loss_through_an_outage_and_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["demo", "--duration", "20s", "--ramp", "4s:60", "--json", "--cut-at", "6s", "--cut-for", "6s"])
        .args(["--kill-at", "14s", "--settle", "120s", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(dir.path().join("tailgate.log")).unwrap_or_default();
    assert!(output.status.success(), "demo failed: {}\n{stdout}\ntailgate.log:\n{log}", output.status);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let number = |path: &str| {
        summary.pointer(path).and_then(serde_json::Value::as_f64).unwrap_or_else(|| panic!("{path} in {summary}"))
    };

    // The ground truth, from the lines the demo wrote for the file input.
    let file = std::fs::read_to_string(dir.path().join("logs/shop.log")).unwrap();
    let mut traces: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for line in file.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let entry = traces.entry(line["trace_id"].as_str().unwrap().to_owned()).or_default();
        entry.0 += 1;
        entry.1 |= line["level"] == "ERROR" || line["duration_ms"].as_u64().unwrap() > 200;
    }
    let lines = file.lines().count() as f64;
    let keep_worthy: u64 = traces.values().filter(|(_, keep)| *keep).map(|(n, _)| n).sum();
    let kept_traces: BTreeSet<&String> = traces.iter().filter(|(_, (_, keep))| *keep).map(|(id, _)| id).collect();
    assert!(lines > 2000.0, "{lines} lines");

    for items in ["spans", "log_lines"] {
        assert_eq!(number(&format!("/{items}/sent")), lines, "{items}: one line per span");
        assert_eq!(number(&format!("/{items}/expected")), keep_worthy as f64, "{items}: the ground truth");
        assert_eq!(number(&format!("/{items}/delivered")), keep_worthy as f64, "{items}");
        for zero in ["lost", "duplicated", "unexpected"] {
            assert_eq!(number(&format!("/{items}/{zero}")), 0.0, "{items} {zero}: {summary}");
        }
        let dropped = number(&format!("/{items}/dropped_percent"));
        assert!((74.0..86.0).contains(&dropped), "{items}: {dropped}% stayed on the node");
    }
    assert!(!kept_traces.is_empty());
    assert!(number("/exemplars/received") > 0.0);
    assert_eq!(number("/exemplars/resolving"), number("/exemplars/received"));
    assert_eq!(number("/span_metrics_spans_counted"), lines, "span metrics count every span, kept or not");
    assert!(number("/queue_peak_items") > 0.0);
    assert!(number("/sinks_cut_seconds") >= 5.0);
    assert_eq!(number("/restarts/tail_sample"), 1.0, "{summary}");
    assert_eq!(summary["settled"], true);
}
