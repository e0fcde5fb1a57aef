//! The Prometheus remote-write destination of the export stage, end to end against a real
//! Prometheus 2.42 (`common::prometheus`: remote-write receiver, exemplar storage, a 10 min
//! out-of-order window), read back through its query API:
//!
//! - span metrics count every span that came in, kept or dropped: the calls counter and the
//!   duration histogram's count, per service / span name / kind / status, equal what was sent;
//! - every exemplar Prometheus holds points at a span of a trace the trace sink received;
//! - SIGKILLs of spanmetrics, tail_sample and export during the load neither lose nor double a
//!   span in the counters;
//! - applications' OTLP metrics (gauge, monotonic and non-monotonic sums, histogram) arrive
//!   under Prometheus names with their values;
//! - samples older than `max_sample_age` are dropped before sending, so the fresh series of the
//!   same request are stored and the exporter does not loop;
//! - series Prometheus refuses (400 for a conflicting sample; 2.42 answers 500 "too old
//!   sample" for one older than the out-of-order window) are dropped alone and counted, the rest
//!   of their request is stored, and the metrics behind them flow;
//! - after a Prometheus outage under load the counters end exact.
//!
//! Remote write is at-least-once and span metrics are cumulative series written every flush:
//! every check reads the latest value (an instant query) and waits for it, then checks again a
//! few flushes later to catch overshoot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::prometheus::{Prometheus, now_nanos, now_secs, parse_float};
use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use prost::Message;

const CALLS: &str = "traces_span_metrics_calls_total";
const DURATION: &str = "traces_span_metrics_duration_milliseconds";
/// The spanmetrics connector's default bounds, in ms.
const DEFAULT_BOUNDS_MS: [f64; 16] =
    [2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1400.0, 2000.0, 5000.0, 10000.0, 15000.0];
const HOUR_NANOS: u64 = 3_600_000_000_000;
const MINUTE_NANOS: u64 = 60_000_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Starts tailgate with its metrics going to `prometheus` (with extra `prometheusremotewrite:`
/// keys), exemplars on, span metrics flushed every second; traces and logs go to `backend`.
fn start(backend: std::net::SocketAddr, prometheus: &Prometheus, extra: &str) -> Tailgate {
    Tailgate::start(
        backend,
        &Timing {
            metrics_destination: Some(prometheus.destination(extra)),
            spanmetrics_extra: "  exemplars: { enabled: true }",
            flush_interval: "1s",
            ..Timing::default()
        },
    )
}

/// What to look at when a check fails: Prometheus's answers to the write requests, tailgate's
/// warnings and errors, Prometheus's last log lines.
fn diagnostics(prometheus: &Prometheus, tailgate: &Tailgate) -> String {
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            let lower = l.to_lowercase();
            ["warn", "error", "prometheus", "remote", "drop", "metrics"].iter().any(|w| lower.contains(w))
        })
        .collect();
    format!(
        "\nwrite requests answered, by status: {:?}\ntailgate.log (warnings, errors, metrics; last 30 of {}):\n  {}\nprometheus.log (last 15):\n{}",
        prometheus.write_requests_by_code(),
        lines.len(),
        lines[lines.len().saturating_sub(30)..].join("\n  "),
        prometheus.log_tail(15)
    )
}

/// `mixed_traces(count)` moved to the present: `TestTrace::new` dates trace n at 1.7e9 s + n s
/// (2023); exemplars carry span end times, and Prometheus is asked about the last hours. The
/// durations, hence the sampling outcome, are unchanged.
fn fresh_traces(count: u32) -> Vec<TestTrace> {
    let mut traces = mixed_traces(count);
    let base = 1_700_000_000_000_000_000u64;
    let shift = now_nanos() - 2 * MINUTE_NANOS - u64::from(count) * 1_000_000_000 - base;
    for trace in &mut traces {
        for span in &mut trace.spans {
            span.start_time_unix_nano += shift;
            span.end_time_unix_nano += shift;
        }
    }
    traces
}

/// The service `send_in_waves` sends trace `index` under.
fn service_of(index: usize) -> &'static str {
    if index.is_multiple_of(2) { "checkout" } else { "payments" }
}

fn kind_text(span: &Span) -> &'static str {
    match span::SpanKind::try_from(span.kind).unwrap() {
        span::SpanKind::Server => "SPAN_KIND_SERVER",
        span::SpanKind::Client => "SPAN_KIND_CLIENT",
        span::SpanKind::Internal => "SPAN_KIND_INTERNAL",
        span::SpanKind::Producer => "SPAN_KIND_PRODUCER",
        span::SpanKind::Consumer => "SPAN_KIND_CONSUMER",
        span::SpanKind::Unspecified => "SPAN_KIND_UNSPECIFIED",
    }
}

fn status_text(span: &Span) -> &'static str {
    match span.status.as_ref().map(|s| status::StatusCode::try_from(s.code).unwrap()) {
        Some(status::StatusCode::Ok) => "STATUS_CODE_OK",
        Some(status::StatusCode::Error) => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

fn duration_ms(span: &Span) -> f64 {
    (span.end_time_unix_nano - span.start_time_unix_nano) as f64 / 1e6
}

/// (service_name, span_name, span_kind, status_code) of a series.
type SeriesKey = (String, String, String, String);

/// Spans per series, from every span sent (kept or dropped).
fn expected_calls(traces: &[TestTrace]) -> BTreeMap<SeriesKey, f64> {
    let mut out = BTreeMap::new();
    for (index, trace) in traces.iter().enumerate() {
        for span in &trace.spans {
            let key = (
                service_of(index).to_owned(),
                span.name.clone(),
                kind_text(span).to_owned(),
                status_text(span).to_owned(),
            );
            *out.entry(key).or_default() += 1.0;
        }
    }
    out
}

fn span_count(traces: &[TestTrace]) -> f64 {
    traces.iter().map(|t| t.spans.len() as f64).sum()
}

/// The latest value per series of `sum by (service_name, span_name, span_kind, status_code)`.
fn per_series(prometheus: &Prometheus, metric: &str) -> BTreeMap<SeriesKey, f64> {
    let query = format!("sum by (service_name, span_name, span_kind, status_code) ({metric})");
    let mut out = BTreeMap::new();
    for sample in prometheus.query(&query) {
        let label = |name: &str| sample.metric.get(name).cloned().unwrap_or_default();
        out.insert((label("service_name"), label("span_name"), label("span_kind"), label("status_code")), sample.value);
    }
    out
}

/// Waits until `sum(metric)` is `want`; fails with what Prometheus holds and the logs.
fn wait_for_sum(prometheus: &Prometheus, tailgate: &Tailgate, metric: &str, want: f64, limit: Duration) {
    let query = format!("sum({metric})");
    let reached = wait_until(limit, || prometheus.value(&query) == Some(want));
    assert!(
        reached,
        "{query} = {:?} after {limit:?}, want {want} (spans sent){}",
        prometheus.value(&query),
        diagnostics(prometheus, tailgate)
    );
}

/// Every counter check of the span metrics at once: calls and histogram count per series equal
/// the spans sent, the buckets hold the spans at or under their bound, `_sum` the durations,
/// and `job` is the service.
fn assert_span_metrics_exact(prometheus: &Prometheus, tailgate: &Tailgate, traces: &[TestTrace]) {
    let total = span_count(traces);
    let expected = expected_calls(traces);
    let context = || diagnostics(prometheus, tailgate);
    assert_eq!(prometheus.value(&format!("sum({CALLS})")), Some(total), "calls{}", context());
    assert_eq!(per_series(prometheus, CALLS), expected, "calls per series{}", context());
    assert_eq!(
        per_series(prometheus, &format!("{DURATION}_count")),
        expected,
        "histogram count per series{}",
        context()
    );

    let spans: Vec<(usize, &Span)> =
        traces.iter().enumerate().flat_map(|(index, t)| t.spans.iter().map(move |s| (index, s))).collect();
    let mut want_sum: BTreeMap<String, f64> = BTreeMap::new();
    for (index, span) in &spans {
        *want_sum.entry(service_of(*index).to_owned()).or_default() += duration_ms(span);
    }
    let got_sum = prometheus.by_label(&format!("sum by (service_name) ({DURATION}_sum)"), "service_name");
    assert_eq!(got_sum.keys().collect::<Vec<_>>(), want_sum.keys().collect::<Vec<_>>(), "services in _sum");
    for (service, want) in &want_sum {
        assert!((got_sum[service] - want).abs() < 1e-6, "{DURATION}_sum of {service}: {} != {want}", got_sum[service]);
    }

    let buckets: BTreeMap<String, f64> = prometheus.by_label(&format!("sum by (le) ({DURATION}_bucket)"), "le");
    let mut want_bounds: Vec<f64> = DEFAULT_BOUNDS_MS.to_vec();
    want_bounds.push(f64::INFINITY);
    let mut got_bounds: Vec<(f64, f64)> = buckets.iter().map(|(le, v)| (parse_float(le), *v)).collect();
    got_bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(got_bounds.iter().map(|(le, _)| *le).collect::<Vec<_>>(), want_bounds, "bucket bounds (le) {buckets:?}");
    for (le, count) in got_bounds {
        let want = spans.iter().filter(|(_, s)| duration_ms(s) <= le).count() as f64;
        assert_eq!(count, want, "{DURATION}_bucket{{le=\"{le}\"}} summed over series");
    }

    // job = service.name (no service.namespace is set).
    for sample in prometheus.query(CALLS) {
        assert_eq!(sample.metric.get("job"), sample.metric.get("service_name"), "job of {:?}", sample.metric);
    }
}

#[test]
fn span_metrics_count_every_span_sent_kept_or_dropped() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = start(backend_addr, &prometheus, "");
    let traces = fresh_traces(60);
    assert!(traces.iter().any(|t| !t.kept()) && traces.iter().any(TestTrace::kept));
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(300), |_| {}));

    let total = span_count(&traces);
    wait_for_sum(&prometheus, &tailgate, CALLS, total, Duration::from_secs(120));
    wait_for_sum(&prometheus, &tailgate, &format!("{DURATION}_count"), total, Duration::from_secs(30));
    // A few more flushes: nothing may be added on top.
    std::thread::sleep(Duration::from_secs(3));
    assert_span_metrics_exact(&prometheus, &tailgate, &traces);
    // The premise: dropped traces were not delivered, yet their spans were counted.
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), true);
}

/// Remote write over mutual TLS to a Prometheus that serves only TLS and requires a client
/// certificate (`--web.config.file` with `tls_server_config`): with `tls.ca_file`, `cert_file`
/// and `key_file` the span metrics arrive, exact.
#[test]
fn span_metrics_reach_a_prometheus_that_requires_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    common::pki::pki(certs.path());
    let prometheus = Prometheus::start_tls(certs.path());
    assert!(prometheus.write_url().starts_with("https://"));
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tls = format!(
        "tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\" }}",
        certs.path().join("ca.pem").display(),
        certs.path().join("client.pem").display(),
        certs.path().join("client.key").display()
    );
    let tailgate = start(backend_addr, &prometheus, &tls);
    let traces = fresh_traces(12);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(300), |_| {}));
    let total = span_count(&traces);
    wait_for_sum(&prometheus, &tailgate, CALLS, total, Duration::from_secs(120));
    assert_span_metrics_exact(&prometheus, &tailgate, &traces);
}

#[test]
fn every_exemplar_points_at_a_trace_the_sink_received() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = start(backend_addr, &prometheus, "");
    let test_start = now_secs();
    let traces = fresh_traces(60);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(300), |_| {}));

    wait_for_sum(&prometheus, &tailgate, CALLS, span_count(&traces), Duration::from_secs(120));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), true);

    // Which service and span each (trace id, span id) was sent as.
    let mut sent: BTreeMap<(String, String), (&'static str, &Span)> = BTreeMap::new();
    for (index, trace) in traces.iter().enumerate() {
        for span in &trace.spans {
            sent.insert((hex(&span.trace_id), hex(&span.span_id)), (service_of(index), span));
        }
    }
    let kept_services: BTreeSet<&str> =
        traces.iter().enumerate().filter(|(_, t)| t.kept()).map(|(i, _)| service_of(i)).collect();
    let query = format!("{DURATION}_bucket");
    let (start, end) = (test_start - 3600.0, now_secs() + 600.0);
    let exemplar_services = || -> BTreeSet<String> {
        prometheus.exemplars(&query, start, end).iter().filter_map(|e| e.series.get("service_name").cloned()).collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || exemplar_services().len() >= kept_services.len()),
        "exemplars for services {:?}, want every service with kept traces {kept_services:?}{}",
        exemplar_services(),
        diagnostics(&prometheus, &tailgate)
    );
    std::thread::sleep(Duration::from_secs(2));

    let delivered = backend.spans();
    let delivered: BTreeSet<(String, String)> =
        delivered.keys().map(|(trace_id, span_id)| (hex(trace_id), hex(span_id))).collect();
    let exemplars = prometheus.exemplars(&query, start, end);
    let mut dead_links = Vec::new();
    for exemplar in &exemplars {
        let trace_id = exemplar.labels.get("trace_id").cloned().unwrap_or_default();
        let span_id = exemplar.labels.get("span_id").cloned().unwrap_or_default();
        assert!(
            trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "trace_id of {exemplar:?} is not 32 lower-case hex digits"
        );
        assert!(
            span_id.len() == 16 && span_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "span_id of {exemplar:?} is not 16 lower-case hex digits"
        );
        let key = (trace_id, span_id);
        if !delivered.contains(&key) {
            dead_links.push(exemplar.clone());
            continue;
        }
        let (service, span) = sent[&key];
        assert_eq!(exemplar.series.get("__name__").map(String::as_str), Some(query.as_str()));
        assert_eq!(exemplar.series.get("service_name").map(String::as_str), Some(service), "series of {exemplar:?}");
        assert_eq!(exemplar.series.get("span_name"), Some(&span.name), "series of {exemplar:?}");
        assert!(
            (exemplar.value - duration_ms(span)).abs() < 1e-6,
            "exemplar value {} != the span's duration {} ms: {exemplar:?}",
            exemplar.value,
            duration_ms(span)
        );
        let le = parse_float(exemplar.series.get("le").map(String::as_str).unwrap_or("NaN"));
        assert!(exemplar.value <= le, "exemplar {} ms on a bucket le={le}: {exemplar:?}", exemplar.value);
    }
    assert!(
        dead_links.is_empty(),
        "{} of {} exemplars point at spans the trace sink never received (dropped traces?): {:?}",
        dead_links.len(),
        exemplars.len(),
        &dead_links[..dead_links.len().min(5)]
    );
    let services: BTreeSet<&str> =
        exemplars.iter().filter_map(|e| e.series.get("service_name").map(String::as_str)).collect();
    assert_eq!(services, kept_services, "services with exemplars");
}

#[test]
fn killed_stages_neither_lose_nor_double_a_span_in_the_counters() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = start(backend_addr, &prometheus, "");
    let traces = fresh_traces(90);
    // One SIGKILL after each of the five waves, each stage restarted before the next wave.
    let victims = ["spanmetrics", "tail_sample", "export", "spanmetrics", "tail_sample"];
    let mut killed = Vec::new();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(700), |wave| {
        let stage = victims[wave % victims.len()];
        let pid = tailgate.stage_pid(stage).unwrap_or_else(|| panic!("no {stage} process"));
        signal(pid, "KILL");
        tailgate.wait_for_restart(stage, pid);
        killed.push(stage);
    }));
    assert_eq!(killed.len(), victims.len(), "the waves did not all run");
    // More while the traces are being decided (root_grace 3 s, decision_wait 6 s after their
    // first span) and their span metrics flushed and exported.
    for stage in ["spanmetrics", "export", "tail_sample", "spanmetrics", "export", "spanmetrics"] {
        let pid = tailgate.stage_pid(stage).unwrap_or_else(|| panic!("no {stage} process"));
        signal(pid, "KILL");
        tailgate.wait_for_restart(stage, pid);
        std::thread::sleep(Duration::from_millis(700));
    }

    let total = span_count(&traces);
    wait_for_sum(&prometheus, &tailgate, CALLS, total, Duration::from_secs(150));
    wait_for_sum(&prometheus, &tailgate, &format!("{DURATION}_count"), total, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(4));
    assert_span_metrics_exact(&prometheus, &tailgate, &traces);
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), true);
}

// ---- application metrics ------------------------------------------------------------------

fn attributes(pairs: &[(&str, &str)]) -> Vec<KeyValue> {
    pairs.iter().map(|(k, v)| string_kv(k, v)).collect()
}

fn double_point(value: f64, time: u64, labels: &[(&str, &str)]) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: time - MINUTE_NANOS,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

fn int_point(value: i64, start: u64, time: u64, labels: &[(&str, &str)]) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsInt(value)),
        ..Default::default()
    }
}

fn gauge(name: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric { name: name.into(), data: Some(metric::Data::Gauge(Gauge { data_points: points })), ..Default::default() }
}

fn cumulative_sum(name: &str, monotonic: bool, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: monotonic,
        })),
        ..Default::default()
    }
}

fn histogram(name: &str, points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    }
}

/// A cumulative histogram point with explicit bounds.
fn histogram_point(bounds: &[f64], counts: &[u64], sum: f64, time: u64, labels: &[(&str, &str)]) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: time - MINUTE_NANOS,
        time_unix_nano: time,
        count: counts.iter().sum(),
        sum: Some(sum),
        bucket_counts: counts.to_vec(),
        explicit_bounds: bounds.to_vec(),
        ..Default::default()
    }
}

/// One request with a resource (`service.name`) per group.
fn metrics_request(groups: Vec<(&str, Vec<Metric>)>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: groups
            .into_iter()
            .map(|(service, metrics)| ResourceMetrics {
                resource: Some(Resource { attributes: vec![string_kv("service.name", service)], ..Default::default() }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: "remote-write-tests".into(), ..Default::default() }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

fn send_metrics_grpc(runtime: &tokio::runtime::Runtime, tailgate: &Tailgate, request: ExportMetricsServiceRequest) {
    let grpc = tailgate.grpc;
    runtime.block_on(async move {
        let mut client = MetricsServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.export(request).await.unwrap();
    });
}

fn send_metrics_http(runtime: &tokio::runtime::Runtime, tailgate: &Tailgate, request: ExportMetricsServiceRequest) {
    let http = tailgate.http;
    runtime.block_on(async move {
        let response = http_client()
            .build()
            .unwrap()
            .post(format!("http://{http}/v1/metrics"))
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "OTLP/HTTP metrics request refused");
    });
}

/// Waits until the instant query `promql` has exactly the single value `want`.
fn wait_for_value(prometheus: &Prometheus, tailgate: &Tailgate, promql: &str, want: f64, limit: Duration) {
    let reached = wait_until(limit, || prometheus.query(promql).iter().map(|s| s.value).collect::<Vec<_>>() == [want]);
    assert!(
        reached,
        "{promql} = {:?} after {limit:?}, want [{want}]{}",
        prometheus.query(promql),
        diagnostics(prometheus, tailgate)
    );
}

#[test]
fn application_metrics_arrive_under_prometheus_names() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = start(backend_addr, &prometheus, "");
    let bounds = [10.0, 100.0];
    let t1 = now_nanos() - 5_000_000_000;
    let started = t1 - 10 * MINUTE_NANOS;
    let first = metrics_request(vec![
        (
            "shop",
            vec![
                gauge("app.temperature", vec![double_point(21.5, t1, &[("room", "lab")])]),
                gauge("app.queue.depth", vec![int_point(7, 0, t1, &[])]),
                Metric { unit: "By".into(), ..gauge("app.payload.size", vec![int_point(512, 0, t1, &[])]) },
                cumulative_sum("app.requests", true, vec![int_point(17, started, t1, &[("route", "/cart")])]),
                cumulative_sum("app.connections", false, vec![int_point(3, started, t1, &[])]),
                histogram("app.latency", vec![histogram_point(&bounds, &[3, 5, 2], 345.5, t1, &[("route", "/cart")])]),
            ],
        ),
        (
            "inventory",
            vec![cumulative_sum("app.requests", true, vec![int_point(4, started, t1, &[("route", "/stock")])])],
        ),
    ]);
    send_metrics_grpc(&runtime, &tailgate, first);

    let limit = Duration::from_secs(60);
    wait_for_value(&prometheus, &tailgate, r#"app_temperature{job="shop",room="lab"}"#, 21.5, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_queue_depth{job="shop"}"#, 7.0, limit);
    // The unit becomes a suffix.
    wait_for_value(&prometheus, &tailgate, r#"app_payload_size_bytes{job="shop"}"#, 512.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_requests_total{job="shop",route="/cart"}"#, 17.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_requests_total{job="inventory",route="/stock"}"#, 4.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_latency_count{job="shop",route="/cart"}"#, 10.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_latency_sum{job="shop",route="/cart"}"#, 345.5, limit);
    let buckets = prometheus.by_label(r#"app_latency_bucket{job="shop",route="/cart"}"#, "le");
    let buckets: Vec<(f64, f64)> = buckets.iter().map(|(le, v)| (parse_float(le), *v)).collect();
    let mut sorted = buckets.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(sorted, vec![(10.0, 3.0), (100.0, 8.0), (f64::INFINITY, 10.0)], "cumulative buckets of app_latency");
    // A non-monotonic sum is a gauge in Prometheus: no `_total`.
    wait_for_value(&prometheus, &tailgate, r#"app_connections{job="shop"}"#, 3.0, limit);
    assert!(prometheus.query("app_connections_total").is_empty(), "a non-monotonic sum got the counter suffix");
    assert!(prometheus.query("app_requests").is_empty(), "a monotonic sum stored without `_total`");

    // Later values over OTLP/HTTP: the latest sample is the new one.
    let t2 = now_nanos();
    let second = metrics_request(vec![(
        "shop",
        vec![
            gauge("app.temperature", vec![double_point(19.25, t2, &[("room", "lab")])]),
            cumulative_sum("app.requests", true, vec![int_point(25, started, t2, &[("route", "/cart")])]),
            histogram("app.latency", vec![histogram_point(&bounds, &[4, 5, 3], 400.0, t2, &[("route", "/cart")])]),
        ],
    )]);
    send_metrics_http(&runtime, &tailgate, second);
    wait_for_value(&prometheus, &tailgate, r#"app_temperature{job="shop",room="lab"}"#, 19.25, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_requests_total{job="shop",route="/cart"}"#, 25.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_latency_count{job="shop",route="/cart"}"#, 12.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_latency_bucket{job="shop",route="/cart",le="100"}"#, 9.0, limit);
    // Both samples of the counter are stored, in order.
    let over_time = prometheus.query(r#"count_over_time(app_requests_total{job="shop",route="/cart"}[10m])"#);
    assert_eq!(over_time.iter().map(|s| s.value).collect::<Vec<_>>(), [2.0], "samples of app_requests_total");
    let codes = prometheus.write_requests_by_code();
    assert!(codes.keys().all(|c| c == "204" || c == "200"), "Prometheus refused write requests: {codes:?}");
}

#[test]
fn samples_older_than_max_sample_age_are_dropped_and_the_rest_of_the_request_is_stored() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    // max_sample_age at its default (1 h).
    let mut tailgate = start(backend_addr, &prometheus, "");
    let limit = Duration::from_secs(60);

    // Fresh samples first, so Prometheus's head has a max time: from then on it refuses
    // samples older than 10 min (the out-of-order window; 2.42 answers 500 "too old sample").
    let now = now_nanos();
    send_metrics_grpc(
        &runtime,
        &tailgate,
        metrics_request(vec![("shop", vec![gauge("app.warmup", vec![double_point(1.0, now, &[])])])]),
    );
    wait_for_value(&prometheus, &tailgate, "app_warmup", 1.0, limit);

    let now = now_nanos();
    let stale = now - 3 * HOUR_NANOS;
    let request = metrics_request(vec![
        (
            "shop",
            vec![
                gauge("app.stale", vec![double_point(99.0, stale, &[])]),
                gauge("app.good", vec![double_point(1.5, now, &[])]),
                cumulative_sum("app.stale.requests", true, vec![int_point(4, stale - HOUR_NANOS, stale, &[])]),
                cumulative_sum("app.good.requests", true, vec![int_point(5, now - MINUTE_NANOS, now, &[])]),
                // Counting since 3 h ago, sampled now: a fresh sample.
                cumulative_sum("app.longrunning.requests", true, vec![int_point(9, stale, now, &[])]),
                histogram("app.stale.latency", vec![histogram_point(&[10.0], &[1, 1], 12.0, stale, &[])]),
                gauge(
                    "app.mixed",
                    vec![
                        double_point(3.0, stale, &[("phase", "stale")]),
                        double_point(2.0, now, &[("phase", "fresh")]),
                    ],
                ),
            ],
        ),
        ("inventory", vec![gauge("app.stale.inventory", vec![double_point(7.0, stale, &[])])]),
    ]);
    send_metrics_grpc(&runtime, &tailgate, request);

    wait_for_value(&prometheus, &tailgate, r#"app_good{job="shop"}"#, 1.5, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_good_requests_total{job="shop"}"#, 5.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_longrunning_requests_total{job="shop"}"#, 9.0, limit);
    wait_for_value(&prometheus, &tailgate, r#"app_mixed{job="shop",phase="fresh"}"#, 2.0, limit);
    std::thread::sleep(Duration::from_secs(2));
    for query in
        [r#"count_over_time({__name__=~"app_stale.*"}[4h])"#, r#"count_over_time(app_mixed{phase="stale"}[4h])"#]
    {
        let found = prometheus.query(query);
        assert!(found.is_empty(), "stale samples were stored: {query} = {found:?}");
    }
    let at_stale = prometheus.query_at(r#"{__name__=~"app_stale.*"}"#, stale as f64 / 1e9 + 1.0);
    assert!(at_stale.is_empty(), "stale samples were stored: {at_stale:?}");

    // Nothing was refused (the stale samples never went out), and the exporter is quiet.
    let codes = prometheus.write_requests_by_code();
    assert!(
        codes.keys().all(|c| c == "204" || c == "200"),
        "Prometheus refused write requests: stale samples were sent{}",
        diagnostics(&prometheus, &tailgate)
    );
    let before = prometheus.write_requests_total();
    std::thread::sleep(Duration::from_secs(5));
    let after = prometheus.write_requests_total();
    assert_eq!(
        after,
        before,
        "the exporter keeps writing with nothing new to send{}",
        diagnostics(&prometheus, &tailgate)
    );
    // Counted: 8 samples (two gauges, a counter, a histogram's two buckets, sum and count, one
    // point of app.mixed), in export's counters logged at stop.
    let counters = stage_counters(&mut tailgate, "export");
    assert!(counters.contains(r#"dropped={"stale": 8}"#), "export's drops: {counters}");
}

/// Prometheus refuses a whole request for one sample it cannot take: 400 for another value at a
/// timestamp it holds, and (2.42 with an out-of-order window) 500 "too old sample" for one older
/// than the window. tailgate's export only sends samples newer than the last it sent per series,
/// but that memory is its process's: after a restart of export, a late sample from an
/// application goes out. The refused series must be dropped alone: the good series of the same
/// delivery are stored, nothing is retried for ever, and later metrics still flow.
#[test]
fn series_prometheus_refuses_are_dropped_alone_and_the_metrics_behind_them_flow() {
    let prometheus = Prometheus::start();
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = start(backend_addr, &prometheus, "");
    let limit = Duration::from_secs(60);

    let t0 = now_nanos();
    send_metrics_grpc(
        &runtime,
        &tailgate,
        metrics_request(vec![(
            "shop",
            vec![
                gauge("app.dup", vec![double_point(1.0, t0, &[])]),
                gauge("app.ooo", vec![double_point(1.0, t0, &[])]),
            ],
        )]),
    );
    wait_for_value(&prometheus, &tailgate, "app_dup", 1.0, limit);
    wait_for_value(&prometheus, &tailgate, "app_ooo", 1.0, limit);
    let pid = tailgate.stage_pid("export").expect("no export process");
    signal(pid, "KILL");
    tailgate.wait_for_restart("export", pid);
    let writes_before = prometheus.write_requests_total();

    // One request: another value at app.dup's stored timestamp (400 "duplicate sample for
    // timestamp"), app.ooo 30 min before its stored sample (younger than max_sample_age, so it is
    // sent; older than the 10 min window: 500 "too old sample"), and twenty good series.
    let now = now_nanos();
    let good: Vec<Metric> =
        (0..20).map(|i| gauge(&format!("app.good.{i}"), vec![double_point(f64::from(i), now, &[])])).collect();
    let mut metrics = vec![gauge("app.dup", vec![double_point(2.0, t0, &[])])];
    metrics.extend(good[..10].iter().cloned());
    metrics.push(gauge("app.ooo", vec![double_point(2.0, now - 30 * MINUTE_NANOS, &[])]));
    metrics.extend(good[10..].iter().cloned());
    send_metrics_grpc(&runtime, &tailgate, metrics_request(vec![("shop", metrics)]));

    for i in 0..20 {
        wait_for_value(&prometheus, &tailgate, &format!("app_good_{i}"), f64::from(i), limit);
    }
    let codes = prometheus.write_requests_by_code();
    assert!(
        codes.get("400").copied().unwrap_or(0) >= 1 && codes.get("500").copied().unwrap_or(0) >= 1,
        "premise: Prometheus was to refuse the conflicting (400) and the too old (500) sample{}",
        diagnostics(&prometheus, &tailgate)
    );
    assert_eq!(prometheus.value("app_dup"), Some(1.0), "the conflicting sample replaced the stored one");
    let ooo = prometheus.query(r#"count_over_time(app_ooo[1h])"#);
    assert_eq!(ooo.iter().map(|s| s.value).collect::<Vec<_>>(), [1.0], "app_ooo samples: the too old one was stored");

    // Metrics sent afterwards still arrive, and the refused series are not retried for ever.
    send_metrics_grpc(
        &runtime,
        &tailgate,
        metrics_request(vec![("shop", vec![gauge("app.after", vec![double_point(7.0, now_nanos(), &[])])])]),
    );
    wait_for_value(&prometheus, &tailgate, "app_after", 7.0, limit);
    let settled = wait_until(Duration::from_secs(30), || {
        let before = prometheus.write_requests_total();
        std::thread::sleep(Duration::from_secs(3));
        prometheus.write_requests_total() == before
    });
    assert!(settled, "the exporter keeps writing: refused series retried{}", diagnostics(&prometheus, &tailgate));
    // Isolating 2 refused series among 22 by halving takes a few dozen requests, not more.
    let writes = prometheus.write_requests_total() - writes_before;
    assert!(
        writes <= 44,
        "{writes} write requests to deliver 22 series and the next one{}",
        diagnostics(&prometheus, &tailgate)
    );
    // Counted by reason (by the export process started after the kill).
    let counters = stage_counters(&mut tailgate, "export");
    assert!(counters.contains(r#"dropped={"duplicate_sample": 1, "too_old": 1}"#), "export's drops: {counters}");
}

/// Prometheus down for a while under load (an uplink outage), then back with its data: the
/// backlog is delivered and the counters end exact.
#[test]
fn span_metrics_are_exact_after_a_prometheus_outage() {
    let mut prometheus = Prometheus::start();
    let runtime = runtime();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = start(backend_addr, &prometheus, "");
    let traces = fresh_traces(60);
    let (first, second) = traces.split_at(30);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, first, Duration::from_millis(300), |_| {}));
    wait_for_sum(&prometheus, &tailgate, CALLS, span_count(first), Duration::from_secs(120));

    prometheus.stop();
    // Different trace numbers, same services: the counters go on from the first half.
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, second, Duration::from_millis(300), |_| {}));
    // Several flushes and failed sends while Prometheus is away.
    std::thread::sleep(Duration::from_secs(8));
    prometheus.restart();

    let total = span_count(&traces);
    wait_for_sum(&prometheus, &tailgate, CALLS, total, Duration::from_secs(120));
    wait_for_sum(&prometheus, &tailgate, &format!("{DURATION}_count"), total, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_span_metrics_exact(&prometheus, &tailgate, &traces);
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), true);
}

/// Stops tailgate and returns the `stage counters` line `stage` logged at its exit.
fn stage_counters(tailgate: &mut Tailgate, stage: &str) -> String {
    assert!(tailgate.stop().success(), "tailgate did not stop cleanly");
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    let marker = format!("stage counters stage={stage} ");
    log.lines()
        .rev()
        .find(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no counters of {stage} in the log"))
        .to_owned()
}

/// Lower-case hex, computed here rather than by the product's helper.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
