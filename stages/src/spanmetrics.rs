//! spanmetrics: RED metrics from kept spans only, so every series describes traces that were
//! exported. This first cut counts calls per service, span name, span kind and status code as a
//! cumulative monotonic sum (`traces.span.metrics.calls`, the Collector spanmetrics name).
//!
//! Exactly-once: spans read since the last flush are counted in memory; a flush is one write
//! transaction that adds the counts to the durable series state, appends the metrics batch and
//! moves the cursor past the spans counted. A restart re-counts exactly the unflushed spans.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tailgate_ipc::batch::{self, MetricBatch};
use tailgate_ipc::{Consumer, Edge, Queue};

use crate::context::{StageContext, StageError, unix_nanos_now, wait_if_full};
use crate::limits::MAX_BATCHES_PER_STEP;

const STATE_PREFIX: &[u8] = b"spanmetrics/calls/";
/// The calls metric's name, as the Collector's spanmetrics connector names it.
pub const CALLS_METRIC: &str = "traces.span.metrics.calls";

/// Identity of one series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesKey {
    /// `service.name` of the span's resource.
    pub service: String,
    /// Span name.
    pub span_name: String,
    /// OTLP span kind number.
    pub kind: u8,
    /// OTLP status code number.
    pub status: u8,
}

impl SeriesKey {
    fn encode(&self) -> Vec<u8> {
        let mut key = STATE_PREFIX.to_vec();
        key.extend_from_slice(self.service.as_bytes());
        key.push(0);
        key.extend_from_slice(self.span_name.as_bytes());
        key.push(0);
        key.push(self.kind);
        key.push(self.status);
        key
    }
}

/// Counts read but not yet flushed.
#[derive(Debug, Default)]
pub struct Accumulator {
    deltas: BTreeMap<SeriesKey, u64>,
    /// The cursor as this process last committed (or found) it; `None` before the first read.
    cursor: Option<u64>,
    /// Last `kept_spans` sequence number counted into `deltas`.
    read_pos: u64,
}

impl Accumulator {
    /// Counts kept spans after `read_pos` (starting at the cursor). Returns spans counted.
    pub fn read(&mut self, queue: &Queue) -> Result<(u64, bool), StageError> {
        let rtxn = queue.read()?;
        if self.cursor.is_none() {
            let cursor = queue.cursor(&rtxn, Consumer::Spanmetrics)?;
            self.cursor = Some(cursor);
            self.read_pos = cursor;
        }
        let mut spans = 0;
        for (batches, entry) in queue.entries_after(&rtxn, Edge::KeptSpans, self.read_pos)?.enumerate() {
            if batches == MAX_BATCHES_PER_STEP {
                return Ok((spans, true));
            }
            let (seq, value) = entry?;
            let source = batch::access_spans(value)?;
            for span in source.spans.iter() {
                let service = source
                    .scopes
                    .get(span.scope.to_native() as usize)
                    .and_then(|scope| source.resources.get(scope.resource.to_native() as usize))
                    .map(|resource| resource.service_name.as_str())
                    .unwrap_or("");
                let key = SeriesKey {
                    service: service.to_owned(),
                    span_name: span.name.as_str().to_owned(),
                    kind: span.kind,
                    status: span.status_code,
                };
                *self.deltas.entry(key).or_default() += 1;
            }
            spans += source.spans.len() as u64;
            self.read_pos = seq;
        }
        Ok((spans, false))
    }

    /// Whether anything awaits a flush.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Adds the deltas to the durable series, writes the cumulative values as one metrics batch
    /// and moves the cursor, in one transaction. Returns the number of data points written.
    pub fn flush(&mut self, queue: &Queue, now_unix_nano: u64) -> Result<u32, StageError> {
        if self.deltas.is_empty() {
            return Ok(0);
        }
        let mut wtxn = queue.write()?;
        let cursor = self.cursor.unwrap_or(0);
        let mut series = Vec::with_capacity(self.deltas.len());
        for (key, delta) in &self.deltas {
            let state_key = key.encode();
            let (start, total) = match queue.state_get(&wtxn, &state_key)? {
                Some(raw) if raw.len() == 16 => (word(&raw[..8]), word(&raw[8..])),
                _ => (now_unix_nano, 0),
            };
            let total = total + delta;
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&start.to_be_bytes());
            value[8..].copy_from_slice(&total.to_be_bytes());
            queue.state_put(&mut wtxn, &state_key, &value)?;
            series.push((key.clone(), start, total));
        }
        let points = series.len() as u32;
        let request = calls_request(&series, now_unix_nano).encode_to_vec();
        let out = MetricBatch { received_unix_nano: now_unix_nano, requests: vec![request], data_points: points };
        queue.append(&mut wtxn, Edge::Metrics, &batch::encode_metrics(&out)?)?;
        queue.advance(&mut wtxn, Consumer::Spanmetrics, cursor, self.read_pos)?;
        queue.commit(wtxn)?;
        self.cursor = Some(self.read_pos);
        self.deltas.clear();
        Ok(points)
    }
}

fn word(raw: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&raw[..8]);
    u64::from_be_bytes(bytes)
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "SPAN_KIND_INTERNAL",
        2 => "SPAN_KIND_SERVER",
        3 => "SPAN_KIND_CLIENT",
        4 => "SPAN_KIND_PRODUCER",
        5 => "SPAN_KIND_CONSUMER",
        _ => "SPAN_KIND_UNSPECIFIED",
    }
}

fn status_name(status: u8) -> &'static str {
    match status {
        1 => "STATUS_CODE_OK",
        2 => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

/// Builds the OTLP request: one resource per service, one cumulative sum per series.
fn calls_request(series: &[(SeriesKey, u64, u64)], now_unix_nano: u64) -> ExportMetricsServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<NumberDataPoint>> = BTreeMap::new();
    for (key, start, total) in series {
        by_service.entry(key.service.as_str()).or_default().push(NumberDataPoint {
            attributes: vec![
                string_attribute("span.name", &key.span_name),
                string_attribute("span.kind", kind_name(key.kind)),
                string_attribute("status.code", status_name(key.status)),
            ],
            start_time_unix_nano: *start,
            time_unix_nano: now_unix_nano,
            value: Some(number_data_point::Value::AsInt(i64::try_from(*total).unwrap_or(i64::MAX))),
            ..Default::default()
        });
    }
    let resource_metrics = by_service
        .into_iter()
        .map(|(service, data_points)| ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_attribute("service.name", service)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope { name: "tailgate/spanmetrics".into(), ..Default::default() }),
                metrics: vec![Metric {
                    name: CALLS_METRIC.into(),
                    unit: "{call}".into(),
                    data: Some(metric::Data::Sum(Sum {
                        data_points,
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

/// Runs the stage: counts as spans arrive, flushes every `metrics_flush_interval`, and once
/// more when told to stop.
pub async fn run(mut ctx: StageContext) -> Result<(), StageError> {
    let interval = ctx.config.spanmetrics.metrics_flush_interval;
    let mut accumulator = Accumulator::default();
    let mut next_flush = Instant::now() + interval;
    let mut full_streak = 0;
    while !ctx.stopping() {
        let (spans, more) = accumulator.read(&ctx.queue)?;
        ctx.events.received(spans);
        if Instant::now() >= next_flush {
            match accumulator.flush(&ctx.queue, unix_nanos_now()) {
                Ok(points) => {
                    full_streak = 0;
                    if points > 0 {
                        ctx.events.sent(u64::from(points));
                        ctx.waker.edge_written(Edge::Metrics);
                    }
                    next_flush = Instant::now() + interval;
                }
                // Nothing was committed; the counts stay in memory for the next attempt.
                Err(err) => wait_if_full(&ctx, err, &mut full_streak).await?,
            }
        }
        if more {
            continue;
        }
        // Sleep until woken by new spans; only wake for a flush when something is pending.
        let timeout = (!accumulator.is_empty()).then(|| next_flush.saturating_duration_since(Instant::now()));
        ctx.idle(timeout.map(|t| t + Duration::from_millis(1))).await;
    }
    let points = accumulator.flush(&ctx.queue, unix_nanos_now())?;
    if points > 0 {
        ctx.waker.edge_written(Edge::Metrics);
    }
    ctx.events.log_summary();
    Ok(())
}
