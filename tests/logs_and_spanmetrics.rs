//! log_mirror and spanmetrics move real data: a log record is delivered iff its trace was kept
//! (records without a trace id: iff ERROR or above), and the calls metric counts exactly the
//! decided spans (kept and dropped) per service and span name.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::resource::v1::Resource;

fn log(body: &str, severity: i32, trace_id: Option<[u8; 16]>) -> LogRecord {
    LogRecord {
        time_unix_nano: 1_700_000_000_000_000_000,
        severity_number: severity,
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(body.into())) }),
        trace_id: trace_id.map(|t| t.to_vec()).unwrap_or_default(),
        ..Default::default()
    }
}

fn logs_request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource { attributes: vec![string_kv("service.name", "checkout")], ..Default::default() }),
            scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    }
}

#[test]
fn logs_follow_their_trace_and_metrics_count_every_span() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = mixed_traces(30);
    let mut records = Vec::new();
    let mut expected_bodies = BTreeSet::new();
    for trace in &traces {
        // Two INFO records per trace, one logged before the trace's spans are sent.
        for i in 0..2 {
            let body = format!("trace {:02x?} line {i}", &trace.trace_id[..4]);
            if trace.kept() {
                expected_bodies.insert(body.clone());
            }
            records.push(log(&body, 9, Some(trace.trace_id)));
        }
    }
    records.push(log("untraced error", 17, None));
    records.push(log("untraced info", 9, None));
    expected_bodies.insert("untraced error".to_string());
    runtime.block_on(async {
        let mut logs = LogsServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        logs.export(logs_request(records)).await.unwrap();
        let mut spans = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        for trace in &traces {
            spans.export(trace_request("checkout", trace.spans.clone())).await.unwrap();
        }
    });
    let bodies = || -> Vec<String> {
        let received = backend.received.lock().unwrap();
        received
            .logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records)
            .filter_map(|l| match l.body.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    };
    assert!(wait_until(Duration::from_secs(30), || bodies().len() >= expected_bodies.len()), "logs did not arrive");
    std::thread::sleep(Duration::from_secs(2));
    let delivered = bodies();
    assert_eq!(delivered.len(), expected_bodies.len(), "duplicates or extras: {delivered:?}");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), expected_bodies);

    // Calls per span name from every span, kept or dropped (rates describe the real traffic),
    // as the latest cumulative value.
    let mut expected_calls: BTreeMap<String, i64> = BTreeMap::new();
    for trace in &traces {
        for span in &trace.spans {
            *expected_calls.entry(span.name.clone()).or_default() += 1;
        }
    }
    let latest_calls = || -> BTreeMap<String, i64> {
        let received = backend.received.lock().unwrap();
        // Latest cumulative value per series (name, kind, status), then summed per span name.
        let mut latest: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
        for request in &received.metrics {
            for rm in &request.resource_metrics {
                for sm in &rm.scope_metrics {
                    for m in sm.metrics.iter().filter(|m| m.name == "traces.span.metrics.calls") {
                        let Some(metric::Data::Sum(sum)) = &m.data else { continue };
                        for point in &sum.data_points {
                            let name = point
                                .attributes
                                .iter()
                                .find(|kv| kv.key == "span.name")
                                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    any_value::Value::StringValue(s) => Some(s.clone()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            let value = match point.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v)) => v,
                                _ => 0,
                            };
                            let series = format!("{:?}", point.attributes);
                            let entry = latest.entry((name, series)).or_insert((0, 0));
                            if point.time_unix_nano >= entry.0 {
                                *entry = (point.time_unix_nano, value);
                            }
                        }
                    }
                }
            }
        }
        let mut calls = BTreeMap::new();
        for ((name, _), (_, value)) in latest {
            *calls.entry(name).or_default() += value;
        }
        calls
    };
    assert!(
        wait_until(Duration::from_secs(30), || latest_calls() == expected_calls),
        "calls {:?} != expected {:?}",
        latest_calls(),
        expected_calls
    );
}
