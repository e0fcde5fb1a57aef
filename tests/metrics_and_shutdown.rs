//! Metrics pass through unaltered; a clean stop in the middle of the flow keeps everything
//! queued for the next start.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

fn gauge_request(n: u32) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_kv("service.name", "edge-agent")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: format!("queue.depth.{n}"),
                    unit: "{item}".into(),
                    data: Some(metric::Data::Gauge(Gauge {
                        data_points: vec![NumberDataPoint {
                            time_unix_nano: 1_700_000_000_000_000_000 + u64::from(n),
                            value: Some(number_data_point::Value::AsInt(i64::from(n))),
                            ..Default::default()
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[test]
fn received_metrics_are_forwarded_unaltered() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let sent: Vec<ExportMetricsServiceRequest> = (0..10).map(gauge_request).collect();
    runtime.block_on(async {
        let mut client = MetricsServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        for request in &sent {
            client.export(request.clone()).await.unwrap();
        }
    });
    let forwarded = || -> Vec<ResourceMetrics> {
        let received = backend.received.lock().unwrap();
        received
            .metrics
            .iter()
            .flat_map(|r| r.resource_metrics.iter().cloned())
            .filter(|rm| rm.scope_metrics.iter().flat_map(|s| &s.metrics).any(|m| m.name.starts_with("queue.depth.")))
            .collect()
    };
    assert!(wait_until(Duration::from_secs(20), || forwarded().len() >= sent.len()));
    std::thread::sleep(Duration::from_secs(1));
    let expected: Vec<ResourceMetrics> = sent.into_iter().flat_map(|r| r.resource_metrics).collect();
    assert_eq!(forwarded(), expected);
}

#[test]
fn a_clean_stop_mid_flow_keeps_everything_for_the_next_start() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "20s", root_grace: "10s", ..Timing::default() };
    let mut tailgate = Tailgate::start(backend_addr, &timing);
    let traces = mixed_traces(60);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(100), |_| {}));
    // Nothing is decided yet (root_grace 10 s): the stop finds every trace pending.
    let status = tailgate.stop();
    assert!(status.success(), "{status:?}");
    assert!(backend.spans().is_empty());
    assert!(!tailgate.data_dir().join("RUNNING").exists(), "a clean stop removes the marker");
    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    // Decisions come due by their original receive time, at most root_grace after it.
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    assert!(!log.contains("did not shut down cleanly"), "{log}");
}
