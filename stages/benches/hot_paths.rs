//! Micro-benchmarks of the hot paths, per item: the OTLP transcode (wire bytes -> batch), the
//! queue's append and checked read, and the sampler's step with the issue's four policies.
//! `cargo bench -p tailgate-stages --bench hot_paths` (figures in BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use tailgate_ipc::{Edge, Queue, QueueOptions, batch};
use tailgate_stages::tail_sample::{Policy, Sampler};

const SPANS_PER_REQUEST: u64 = 510;
const T0: u64 = 1_700_000_000_000_000_000;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// Request `n`: 102 traces of 5 spans (a server root, four children), 1 in 20 with an error,
/// 1 in 7 with a 250 ms root, as the load generator shapes them.
fn request(n: u64) -> Vec<u8> {
    let mut spans = Vec::new();
    for t in 0..SPANS_PER_REQUEST / 5 {
        let trace = n * 1000 + t;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&trace.to_be_bytes());
        trace_id[8..].copy_from_slice(&trace.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        for s in 0..5u64 {
            let root = s == 0;
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: (trace * 8 + s + 1).to_be_bytes().to_vec(),
                parent_span_id: if root { Vec::new() } else { (trace * 8 + 1).to_be_bytes().to_vec() },
                name: if root { "GET /api/orders".into() } else { format!("SELECT orders {s}") },
                start_time_unix_nano: T0,
                end_time_unix_nano: T0 + if root && trace.is_multiple_of(7) { 250_000_000 } else { 6_000_000 },
                attributes: vec![kv("http.route", "/api/orders"), kv("db.system", "postgresql")],
                status: Some(Status {
                    code: if trace.is_multiple_of(20) && s == 4 { 2 } else { 0 },
                    message: String::new(),
                }),
                ..Default::default()
            });
        }
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![kv("service.name", "orders")], ..Default::default() }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn stored(n: u64) -> Vec<u8> {
    batch::encode_spans(
        &tailgate_stages::otlp_wire::transcode_traces(&request(n), T0 + n, &tailgate_stages::otlp_wire::Limits::NONE)
            .unwrap()
            .batch,
    )
    .unwrap()
}

fn transcode(c: &mut Criterion) {
    let bytes = request(1);
    let mut group = c.benchmark_group("otlp");
    group.throughput(Throughput::Elements(SPANS_PER_REQUEST));
    group.bench_function("transcode 510 spans", |b| {
        b.iter(|| {
            tailgate_stages::otlp_wire::transcode_traces(
                black_box(&bytes),
                T0,
                &tailgate_stages::otlp_wire::Limits::NONE,
            )
            .unwrap()
            .batch
        })
    });
    group.bench_function("transcode + encode 510 spans", |b| {
        b.iter(|| {
            batch::encode_spans(
                &tailgate_stages::otlp_wire::transcode_traces(
                    black_box(&bytes),
                    T0,
                    &tailgate_stages::otlp_wire::Limits::NONE,
                )
                .unwrap()
                .batch,
            )
        })
    });
    group.finish();
}

fn queue(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 1 << 30, ..Default::default() }).unwrap();
    let value = stored(1);
    let mut group = c.benchmark_group("queue");
    group.throughput(Throughput::Elements(SPANS_PER_REQUEST));
    group.bench_function("append 510 spans + commit", |b| {
        b.iter(|| {
            let mut wtxn = queue.write().unwrap();
            let seq = queue.append(&mut wtxn, Edge::Spans, black_box(&value)).unwrap();
            // Keep the map from filling: drop what was just written.
            queue.advance(&mut wtxn, tailgate_ipc::Consumer::TailSample, seq - 1, seq).unwrap();
            queue.commit(wtxn).unwrap();
        })
    });
    let mut wtxn = queue.write().unwrap();
    let seq = queue.append(&mut wtxn, Edge::Spans, &value).unwrap();
    queue.commit(wtxn).unwrap();
    group.bench_function("read + checked access 510 spans", |b| {
        b.iter(|| {
            let rtxn = queue.read().unwrap();
            let value = queue.get(&rtxn, Edge::Spans, seq).unwrap().unwrap();
            black_box(batch::access_spans(value).unwrap().spans.len())
        })
    });
    group.finish();
}

/// The issue's four policies.
const POLICIES: &str = "
- {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
- {name: slow, type: latency, latency: {threshold_ms: 200}}
- {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}
- {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
";

fn sampler(c: &mut Criterion) {
    const BATCHES: u64 = 20;
    let mut config = tailgate_config::Config::embedded_default().unwrap();
    config.tail_sample.policies = serde_saphyr::from_str(POLICIES).unwrap();
    let values: Vec<Vec<u8>> = (1..=BATCHES).map(stored).collect();
    let mut group = c.benchmark_group("tail_sample");
    group.throughput(Throughput::Elements(BATCHES * SPANS_PER_REQUEST));
    group.sample_size(20);
    group.bench_function("ingest + decide 10,200 spans, 4 policies", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let queue =
                    Queue::open(dir.path(), &QueueOptions { max_size_bytes: 256 << 20, ..Default::default() }).unwrap();
                let mut wtxn = queue.write().unwrap();
                for value in &values {
                    queue.append(&mut wtxn, Edge::Spans, value).unwrap();
                }
                queue.commit(wtxn).unwrap();
                let sampler = Sampler::open(&queue, Policy::from_config(&config)).unwrap();
                (dir, queue, sampler)
            },
            |(dir, queue, mut sampler)| {
                // Far past every receive time: everything is read and decided.
                let now = T0 + 3_600_000_000_000;
                while sampler.step(&queue, now).unwrap().more_input {}
                black_box(sampler.pending_traces());
                (dir, queue)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A JSON log line as the field report's services write them (the load profile's shape).
fn log_line(n: u64) -> String {
    format!(
        r#"{{"time":1764600000{:03},"level":"{}","msg":"GET /api/orders step {}","trace_id":"{:032x}","span_id":"{:016x}","service":"orders","http.route":"/api/orders","duration_ms":{}}}"#,
        n % 1000,
        if n.is_multiple_of(20) { "ERROR" } else { "INFO" },
        n % 5,
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834) | 1,
        n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        n % 300,
    )
}

fn filelog(c: &mut Criterion) {
    const LINES: u64 = 100;
    let config: tailgate_config::FilelogReceiver =
        serde_json::from_value(serde_json::json!({ "include": ["/var/log/app/*.jsonl"] })).unwrap();
    let parser = tailgate_stages::receive::filelog::fields::LineParser::new(&config);
    let lines: Vec<String> = (0..LINES).map(log_line).collect();
    let mut group = c.benchmark_group("filelog");
    group.throughput(Throughput::Elements(LINES));
    group.bench_function("parse 100 JSON lines", |b| {
        b.iter(|| {
            let mut drift = tailgate_stages::receive::filelog::drift::Drift::default();
            // As the tailer reads: the file's attributes encoded once per read.
            let attributes = parser.file_attributes("/var/log/app/orders.jsonl");
            for line in &lines {
                black_box(parser.parse_with(black_box(line), &attributes, T0, &mut drift));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = transcode, queue, sampler, filelog
}
criterion_main!(benches);
