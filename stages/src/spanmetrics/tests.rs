use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric;
use tailgate_config::SpanmetricsConfig;
use tailgate_ipc::QueueOptions;
use tailgate_ipc::batch::{SpanSummary, SummaryBatch};

use super::*;

fn open_queue() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    (dir, queue)
}

fn summary(name: &str, ms: u64, kept: bool, n: u8) -> SpanSummary {
    SpanSummary {
        trace_id: [n; 16],
        span_id: [n; 8],
        end_unix_nano: 5,
        duration_nanos: ms * 1_000_000,
        kind: 2,
        status_code: 0,
        kept,
        service: 0,
        name: name.into(),
        dimensions: Vec::new(),
    }
}

fn append(queue: &Queue, summaries: Vec<SpanSummary>) {
    let batch = SummaryBatch { decided_unix_nano: 1, services: vec!["checkout".into()], summaries };
    let mut wtxn = queue.write().unwrap();
    queue.append(&mut wtxn, Edge::SpanSummaries, &batch::encode_summaries(&batch).unwrap()).unwrap();
    queue.commit(wtxn).unwrap();
}

/// The last metrics request written.
fn last_request(queue: &Queue) -> ExportMetricsServiceRequest {
    let rtxn = queue.read().unwrap();
    let (_, value) = queue.entries_after(&rtxn, Edge::Metrics, 0).unwrap().last().unwrap().unwrap();
    let batch = batch::access_metrics(value).unwrap();
    ExportMetricsServiceRequest::decode(batch.requests[0].as_slice()).unwrap()
}

/// (span name, calls, histogram count, bucket counts, exemplar trace ids) of one series.
type Series = (String, i64, u64, Vec<u64>, Vec<Vec<u8>>);

/// Every series of a request.
fn series_of(request: &ExportMetricsServiceRequest) -> Vec<Series> {
    let mut calls = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for resource in &request.resource_metrics {
        for metric in &resource.scope_metrics[0].metrics {
            match &metric.data {
                Some(metric::Data::Sum(sum)) => {
                    for point in &sum.data_points {
                        let name = format!("{:?}", point.attributes.get(1).and_then(|a| a.value.clone()));
                        let Some(number_data_point::Value::AsInt(value)) = point.value else { panic!() };
                        calls.insert(name, value);
                    }
                }
                Some(metric::Data::Histogram(histogram)) => {
                    for point in &histogram.data_points {
                        let name = format!("{:?}", point.attributes.get(1).and_then(|a| a.value.clone()));
                        let exemplars = point.exemplars.iter().map(|e| e.trace_id.clone()).collect();
                        out.push((name, 0, point.count, point.bucket_counts.clone(), exemplars));
                    }
                }
                _ => {}
            }
        }
    }
    for entry in &mut out {
        entry.1 = calls[&entry.0];
    }
    out.sort();
    out
}

use opentelemetry_proto::tonic::metrics::v1::number_data_point;

#[test]
fn every_decided_span_counts_and_only_kept_ones_give_exemplars() {
    let (_dir, queue) = open_queue();
    let mut config = SpanmetricsConfig::default();
    config.exemplars.enabled = true;
    append(&queue, vec![summary("GET /", 3, false, 1), summary("GET /", 350, true, 2), summary("GET /", 30, false, 3)]);
    let mut accumulator = Accumulator::new(&config);
    assert_eq!(accumulator.read(&queue).unwrap(), (3, false));
    assert_eq!(accumulator.flush(&queue, 100).unwrap(), 2);
    let series = series_of(&last_request(&queue));
    assert_eq!(series.len(), 1);
    let (_, calls, count, buckets, exemplars) = &series[0];
    assert_eq!((*calls, *count), (3, 3));
    // 3 ms -> (2,4]; 30 ms -> (10,50]; 350 ms -> (200,400].
    let mut expected = vec![0u64; 17];
    expected[1] = 1;
    expected[5] = 1;
    expected[8] = 1;
    assert_eq!(buckets, &expected);
    assert_eq!(exemplars, &vec![vec![2u8; 16]], "only the kept span is an exemplar");
    // A restart counts on from the durable state: cumulative values grow.
    append(&queue, vec![summary("GET /", 1, false, 4)]);
    let mut restarted = Accumulator::new(&config);
    restarted.read(&queue).unwrap();
    restarted.flush(&queue, 200).unwrap();
    assert_eq!(series_of(&last_request(&queue))[0].1, 4);
}

#[test]
fn source_kept_counts_kept_spans_only() {
    let (_dir, queue) = open_queue();
    let config = SpanmetricsConfig { source: tailgate_config::SpanmetricsSource::Kept, ..Default::default() };
    append(&queue, vec![summary("GET /", 3, false, 1), summary("GET /", 350, true, 2)]);
    let mut accumulator = Accumulator::new(&config);
    accumulator.read(&queue).unwrap();
    accumulator.flush(&queue, 100).unwrap();
    assert_eq!(series_of(&last_request(&queue))[0].1, 1);
}

#[test]
fn a_flood_of_names_ends_in_the_overflow_series_and_state_stays_bounded() {
    let (_dir, queue) = open_queue();
    let config = SpanmetricsConfig { aggregation_cardinality_limit: 10, ..Default::default() };
    let mut accumulator = Accumulator::new(&config);
    for round in 0..5 {
        let summaries = (0..100).map(|n| summary(&format!("GET /item/{round}-{n}"), 5, false, 1)).collect();
        append(&queue, summaries);
        accumulator.read(&queue).unwrap();
        accumulator.flush(&queue, 100 + round).unwrap();
    }
    let rtxn = queue.read().unwrap();
    let stored = queue.state_prefix(&rtxn, SERIES_PREFIX).unwrap();
    assert_eq!(stored.len(), 11, "10 series and the overflow series");
    let overflow = stored.iter().find(|(key, _)| SeriesKey::decode(key).unwrap().overflow).unwrap();
    let state = SeriesState::decode(overflow.1, 17).unwrap();
    assert_eq!(state.calls, 500 - 10);
}

#[test]
fn idle_series_expire() {
    let (_dir, queue) = open_queue();
    let config = SpanmetricsConfig { metrics_expiration: Duration::from_secs(60), ..Default::default() };
    let mut accumulator = Accumulator::new(&config);
    append(&queue, vec![summary("old", 5, false, 1)]);
    accumulator.read(&queue).unwrap();
    accumulator.flush(&queue, 1_000_000_000).unwrap();
    append(&queue, vec![summary("new", 5, false, 1)]);
    accumulator.read(&queue).unwrap();
    accumulator.flush(&queue, 120_000_000_000).unwrap();
    let rtxn = queue.read().unwrap();
    let names: Vec<String> = queue
        .state_prefix(&rtxn, SERIES_PREFIX)
        .unwrap()
        .iter()
        .map(|(key, _)| SeriesKey::decode(key).unwrap().span_name)
        .collect();
    assert_eq!(names, vec!["new".to_owned()]);
    assert_eq!(accumulator.series(), 1);
}

#[test]
fn dimensions_take_span_values_then_defaults_and_split_series() {
    let (_dir, queue) = open_queue();
    let config = SpanmetricsConfig {
        dimensions: vec![
            tailgate_config::DimensionConfig { name: "http.method".into(), default: None },
            tailgate_config::DimensionConfig { name: "region".into(), default: Some("eu".into()) },
        ],
        ..SpanmetricsConfig::default()
    };
    let with = |method: &str, region: &str| SpanSummary {
        dimensions: vec![method.into(), region.into()],
        ..summary("GET /", 5, false, 1)
    };
    append(&queue, vec![with("GET", ""), with("GET", ""), with("POST", "us"), with("", "")]);
    let mut accumulator = Accumulator::new(&config);
    accumulator.read(&queue).unwrap();
    accumulator.flush(&queue, 100).unwrap();
    let rtxn = queue.read().unwrap();
    let mut series: Vec<(Vec<(String, String)>, u64)> = queue
        .state_prefix(&rtxn, SERIES_PREFIX)
        .unwrap()
        .iter()
        .map(|(key, value)| (SeriesKey::decode(key).unwrap().dimensions, SeriesState::decode(value, 17).unwrap().calls))
        .collect();
    series.sort();
    let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    assert_eq!(
        series,
        vec![
            (vec![pair("http.method", "GET"), pair("region", "eu")], 2),
            (vec![pair("http.method", "POST"), pair("region", "us")], 1),
            (vec![pair("region", "eu")], 1),
        ]
    );
}

fn append_deltas(queue: &Queue, bounds_ms: Vec<f64>, series: Vec<batch::SeriesDelta>) {
    let batch = batch::SeriesDeltaBatch { decided_unix_nano: 1, bounds_ms, series };
    let mut wtxn = queue.write().unwrap();
    queue.append(&mut wtxn, Edge::SpanSummaries, &batch::encode_series_deltas(&batch).unwrap()).unwrap();
    queue.commit(wtxn).unwrap();
}

/// tail_sample's count of `summaries` (one series per name), as it writes it.
fn deltas_of(summaries: &[SpanSummary], bounds_ms: &[f64]) -> Vec<batch::SeriesDelta> {
    let mut out: Vec<batch::SeriesDelta> = Vec::new();
    for summary in summaries {
        let at = match out.iter().position(|d| d.name == summary.name) {
            Some(at) => at,
            None => {
                out.push(batch::SeriesDelta {
                    service: "checkout".into(),
                    name: summary.name.clone(),
                    kind: summary.kind,
                    status_code: summary.status_code,
                    buckets: vec![0; bounds_ms.len() + 1],
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let value_ms = summary.duration_nanos as f64 / 1e6;
        let delta = &mut out[at];
        delta.calls += 1;
        delta.sum_ms += value_ms;
        delta.buckets[batch::bucket_of(bounds_ms, value_ms)] += 1;
        if summary.kept {
            delta.exemplars.push(batch::SpanExemplar {
                trace_id: summary.trace_id,
                span_id: summary.span_id,
                value_ms,
                time_unix_nano: summary.end_unix_nano,
            });
        }
    }
    out
}

#[test]
fn series_deltas_count_like_the_summaries_of_the_same_spans() {
    let mut config = SpanmetricsConfig::default();
    config.exemplars.enabled = true;
    config.exemplars.max_per_data_point = 2;
    let bounds = config.histogram.bounds_ms();
    let first = vec![summary("GET /", 3, false, 1), summary("GET /", 350, true, 2), summary("POST /", 7, true, 3)];
    let second = vec![summary("GET /", 30, true, 4), summary("GET /", 1, true, 5), summary("POST /", 70, false, 6)];
    // Earlier versions' per-span summaries only.
    let (_a, summaries_only) = open_queue();
    append(&summaries_only, first.clone());
    append(&summaries_only, second.clone());
    // An upgrade: summaries still queued, then tail_sample's per-series deltas.
    let (_b, mixed) = open_queue();
    append(&mixed, first);
    append_deltas(&mixed, bounds.clone(), deltas_of(&second, &bounds));
    let mut got = Vec::new();
    for queue in [&summaries_only, &mixed] {
        let mut accumulator = Accumulator::new(&config);
        assert_eq!(accumulator.read(queue).unwrap(), (6, false), "every span counted once");
        accumulator.flush(queue, 100).unwrap();
        got.push(series_of(&last_request(queue)));
    }
    assert_eq!(got[0], got[1]);
    let get = got[0].iter().find(|s| s.0.contains("GET /")).unwrap();
    assert_eq!(get.1, 4);
    assert_eq!(get.4, vec![vec![2u8; 16], vec![4u8; 16]], "the first kept spans, at most max_per_data_point");
}

#[test]
fn deltas_bucketed_under_other_bounds_land_in_the_bucket_of_their_upper_bound() {
    let (_dir, queue) = open_queue();
    let config = SpanmetricsConfig::default();
    let delta = batch::SeriesDelta {
        service: "checkout".into(),
        name: "GET /".into(),
        kind: 2,
        calls: 6,
        sum_ms: 600.0,
        buckets: vec![1, 2, 3],
        ..Default::default()
    };
    append_deltas(&queue, vec![5.0, 100.0], vec![delta]);
    let mut accumulator = Accumulator::new(&config);
    accumulator.read(&queue).unwrap();
    accumulator.flush(&queue, 100).unwrap();
    let series = series_of(&last_request(&queue));
    let mut expected = vec![0u64; 17];
    expected[2] = 1; // (4, 6] holds 5 ms
    expected[6] = 2; // (50, 100]
    expected[16] = 3; // +Inf
    assert_eq!((series[0].1, series[0].2, &series[0].3), (6, 6, &expected));
}
