//! `tailgate import-otel-config` on an edge Collector's configuration (tests/otel/): the result
//! passes `tailgate check-config`, carries what has a tailgate counterpart (receivers, the
//! tail_sampling policies, memory_limiter, batch, the spanmetrics connector, exporters with
//! their sending_queue storage and retries, telemetry), and names every key it could not map.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::process::Command;

use tailgate_config::Config;

#[test]
fn an_edge_collector_config_becomes_a_valid_tailgate_config_and_the_rest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
    let collector = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otel/edge-collector.yaml"))
        .unwrap()
        .replace("/etc/otelcol/ca.pem", &ca.display().to_string());
    let input = dir.path().join("collector.yaml");
    let output = dir.path().join("tailgate.yaml");
    std::fs::write(&input, collector).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["import-otel-config"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.lines().any(|l| l.starts_with("check:")), "the translation has problems:\n{stderr}");

    let check = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("check-config")
        .arg(&output)
        .env("SITE", "edge-1")
        .output()
        .unwrap();
    assert!(check.status.success(), "check-config: {}", String::from_utf8_lossy(&check.stderr));

    let text = std::fs::read_to_string(&output).unwrap();
    let env = |name: &str| (name == "SITE").then(|| "edge-1".to_owned());
    let config = Config::parse_with_env(&text, &env).unwrap();
    assert_eq!(config.data_dir, std::path::PathBuf::from("/var/lib/otelcol/queue"), "file_storage directory");
    assert_eq!(config.log_level, "warn");
    assert_eq!(config.receivers.otlp.as_ref().unwrap().protocols.http.as_ref().unwrap().max_request_body_size_mib, 10);
    let filelog = config.receivers.filelog.as_ref().unwrap();
    assert_eq!(filelog.include, vec!["/var/log/shop/*.jsonl".to_owned()]);
    assert!(filelog.include_file_path);
    assert_eq!(config.tail_sample.decision_wait, std::time::Duration::from_secs(15));
    let names: Vec<&str> = config.tail_sample.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["errors", "slow", "checkout", "baseline"]);
    assert_eq!((config.supervisor.memory_soft_limit_mib, config.supervisor.memory_hard_limit_mib), (320, 400));
    assert_eq!(config.exporters.batch.send_batch_size, 1024);
    assert_eq!(config.exporters.retry_on_failure.max_interval, std::time::Duration::from_secs(30));
    assert!(config.spanmetrics.exemplars.enabled);
    assert_eq!(config.spanmetrics.histogram.explicit.buckets.len(), 4);
    let traces = &config.exporters.traces.otlp;
    assert_eq!(traces.endpoint, "https://jaeger.home.example:4317", "no scheme and TLS: https");
    let logs = config.exporters.logs.as_ref().unwrap();
    assert_eq!(
        logs.loki.as_ref().unwrap().tenant_id.as_deref(),
        Some("edge-1"),
        "X-Scope-OrgID, ${{SITE}} as ${{env:SITE}}"
    );
    assert!(logs.otlp.is_none());
    let metrics = config.exporters.metrics.as_ref().unwrap();
    assert_eq!(metrics.prometheusremotewrite.as_ref().unwrap().endpoint, "https://prom.home.example/api/v1/write");
    assert_eq!(config.supervisor.telemetry.endpoint.to_string(), "127.0.0.1:8888");

    // Everything left is named, in the file's header and on stderr.
    for unmapped in [
        "processors.tail_sampling.num_traces",
        "processors.tail_sampling.expected_new_traces_per_sec",
        "processors.tail_sampling.policies[4]",
        "processors.tail_sampling.policies[3].probabilistic.hash_salt",
        "processors.batch.send_batch_max_size",
        "processors.attributes/env",
        "receivers.hostmetrics",
        "receivers.filelog/app.operators[1]",
        "connectors.spanmetrics.namespace",
        "exporters.otlp/jaeger.sending_queue.queue_size",
        "exporters.otlp/jaeger.retry_on_failure.max_elapsed_time",
        "exporters.prometheusremotewrite.external_labels.site",
        "exporters.debug",
        "extensions.health_check",
    ] {
        assert!(stderr.contains(&format!("not mapped: {unmapped}")), "{unmapped} not named:\n{stderr}");
        assert!(text.contains(&format!("#   {unmapped}")), "{unmapped} not in the header");
    }
    // Nothing that was carried over is reported.
    for mapped in
        ["decision_wait", "limit_mib", "spike_limit_mib", "send_batch_size", "compression", "include_file_path"]
    {
        assert!(!stderr.contains(&format!(".{mapped}:")), "{mapped} reported as not mapped:\n{stderr}");
    }
}

#[test]
fn a_collector_config_without_a_traces_destination_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("collector.yaml");
    std::fs::write(
        &input,
        "receivers: {otlp: {protocols: {grpc: {}}}}\nexporters: {debug: {}}\nservice: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}\n",
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_tailgate")).arg("import-otel-config").arg(&input).output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no OTLP exporter in a traces pipeline"));
}

/// The Collector's minimal gateway: one `otlp` exporter serving all three pipelines, receivers
/// with default settings, no tail_sampling. Every pipeline keeps its destination; sampling keeps
/// every trace, as the Collector forwarded them, and says so.
#[test]
fn one_exporter_for_every_pipeline_and_no_sampling_keep_every_trace() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("collector.yaml");
    std::fs::write(
        &input,
        "receivers:\n  otlp:\n    protocols:\n      grpc:\n      http:\n\
         exporters:\n  otlp:\n    endpoint: backend:4317\n    tls: {insecure: true}\n    compression: zstd\n\
         service:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [otlp]}\n\
         \x20   logs: {receivers: [otlp], exporters: [otlp]}\n    metrics: {receivers: [otlp], exporters: [otlp]}\n",
    )
    .unwrap();
    let output = dir.path().join("tailgate.yaml");
    let run = Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("import-otel-config")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(run.status.success(), "{stderr}");
    let config = Config::load(&output).unwrap();
    assert_eq!(config.exporters.traces.otlp.endpoint, "http://backend:4317");
    let logs = config.exporters.logs.as_ref().and_then(|d| d.otlp.as_ref()).expect("logs destination");
    let metrics = config.exporters.metrics.as_ref().and_then(|d| d.otlp.as_ref()).expect("metrics destination");
    assert_eq!((logs.endpoint.as_str(), metrics.endpoint.as_str()), ("http://backend:4317", "http://backend:4317"));
    let otlp = config.receivers.otlp.as_ref().unwrap();
    assert_eq!(otlp.protocols.grpc.as_ref().unwrap().endpoint, "127.0.0.1:4317");
    assert_eq!(otlp.protocols.http.as_ref().unwrap().endpoint, "127.0.0.1:4318");
    let kinds: Vec<String> = config.tail_sample.policies.iter().map(|p| format!("{:?}", p.kind)).collect();
    assert_eq!(kinds, ["AlwaysSample"]);
    assert!(stderr.contains("every trace is kept"), "{stderr}");
    // A value without a tailgate counterpart is named, not dropped in silence.
    assert!(stderr.contains("not mapped: exporters.otlp.compression"), "{stderr}");
}
