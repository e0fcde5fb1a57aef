//! The Prometheus remote-write exporter: one consumer of `metrics` (span metrics and received
//! OTLP metrics), pushing remote write 1.0 (protobuf + snappy) with exemplars.
//!
//! A delivery reads queue batches after the cursor, converts their OTLP requests into series
//! ([`convert`]), then per series: orders samples by time, clamps timestamps in the future to
//! now, drops samples older than `max_sample_age` (`stale`) and samples not newer than the last
//! one this process sent for the series (`out_of_order`), and sends the series in requests of at
//! most `max_samples_per_send` samples and about 2 MiB encoded.
//!
//! Answers (measured on Prometheus 2.42): 400 (`out of order sample`, `out of bounds`,
//! `duplicate sample for timestamp`) and 500 with `too old sample` (with an out-of-order window)
//! refuse the whole request and store none of it: the request is split until the refused series
//! stand alone ([`super::isolate`]), which are dropped and counted by reason; the good series are
//! stored. 429 and other 5xx are retried with backoff; 401/403/404 hold the backlog and retry.
//! `outage_policy: drop_during_outage` drops what still fails after a few retries.

pub mod convert;
pub mod proto;

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use tailgate_config::{OutagePolicy, RemoteWriteExporter};
use tailgate_ipc::{Consumer, batch};

use super::http::{self, HttpSetup};
use super::isolate::{self, Attempt};
use crate::context::{StageContext, StageError};
use convert::Converted;
use proto::{TimeSeries, WriteRequest};
use tailgate_ipc::clock::wall_now;

/// Series remembered for ordering; beyond this the memory starts over.
const MAX_TRACKED_SERIES: usize = 200_000;

/// A request stops growing at about this many encoded bytes (before snappy), well below the
/// body limits of Prometheus and the gateways in front of it.
const MAX_REQUEST_BYTES: usize = 2 << 20;

/// A remote-write destination.
#[derive(Debug)]
pub struct RemoteWriteSink {
    /// Where responses are counted by code.
    pub responses: crate::events::Responses,
    config: RemoteWriteExporter,
    http: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    /// Last sample time and last exemplar time sent per series (labels joined), Unix ms.
    last_sent: HashMap<String, (i64, i64)>,
}

/// Series of one delivery, ready to send, and what was dropped on the way.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Requests' worth of series, each at most `max_samples_per_send` samples.
    pub chunks: Vec<Vec<TimeSeries>>,
    /// Samples older than `max_sample_age`.
    pub stale: u64,
    /// Samples not newer than the last one sent for their series.
    pub out_of_order: u64,
}

/// Refusal reasons from Prometheus' messages.
pub fn reason_of(body: &str) -> &'static str {
    let body = body.to_ascii_lowercase();
    if body.contains("too old sample") {
        "too_old"
    } else if body.contains("out of order") {
        "out_of_order"
    } else if body.contains("out of bounds") {
        "out_of_bounds"
    } else if body.contains("duplicate sample") {
        "duplicate_sample"
    } else if body.contains("label") {
        "invalid_labels"
    } else {
        "bad_request"
    }
}

/// What an answer means for the request that got it.
pub fn classify(status: u16, body: &str, after: Option<std::time::Duration>) -> Attempt {
    let message = format!("HTTP {status}: {}", body.trim());
    let refused = |message| Attempt::Refused { reason: reason_of(body), message };
    match status {
        200..=299 => Attempt::Accepted,
        // Prometheus answers 500 for samples older than its out-of-order window.
        500 if body.contains("too old sample") || body.contains("out of bounds") => refused(message),
        401 | 403 | 404 | 408 | 429 | 500..=599 => Attempt::Retry { message, after },
        _ => refused(message),
    }
}

impl RemoteWriteSink {
    /// A sink for the configured endpoint; credentials files are read here, once.
    pub fn new(config: &RemoteWriteExporter) -> Result<RemoteWriteSink, StageError> {
        let setup = HttpSetup {
            headers: &config.headers,
            auth: config.auth.as_ref(),
            timeout: config.timeout,
            tls: config.tls.as_ref(),
        };
        let (http, headers) =
            setup.build(None).map_err(|err| StageError::Other(format!("remote write exporter: {err}")))?;
        Ok(RemoteWriteSink {
            responses: crate::events::Responses::default(),
            config: config.clone(),
            http,
            headers,
            last_sent: HashMap::new(),
        })
    }

    async fn push(&self, series: &[TimeSeries]) -> Attempt {
        let body = match http::snappy(&WriteRequest { timeseries: series.to_vec() }.encode_to_vec()) {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let request = self
            .http
            .post(&self.config.endpoint)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .header(reqwest::header::CONTENT_ENCODING, "snappy")
            .header("x-prometheus-remote-write-version", "0.1.0")
            .body(body);
        match http::send(request, &self.responses).await {
            Ok(answer) => classify(answer.status, &answer.body, answer.after),
            Err(failed) => failed,
        }
    }

    /// Orders, filters and batches the series of one delivery. Prometheus stores samples and
    /// exemplars of a series only in increasing time: both are sorted, and those not newer than
    /// what this process last sent for the series are dropped.
    pub fn prepare(&mut self, converted: Converted, now_ms: i64) -> Prepared {
        let oldest = if self.config.max_sample_age.is_zero() {
            i64::MIN
        } else {
            now_ms - self.config.max_sample_age.as_millis() as i64
        };
        let mut prepared = Prepared { chunks: vec![Vec::new()], ..Prepared::default() };
        if self.last_sent.len() > MAX_TRACKED_SERIES {
            self.last_sent.clear();
        }
        let (mut in_chunk, mut chunk_bytes) = (0usize, 0usize);
        for (labels, (mut samples, mut exemplars)) in converted.series {
            for sample in &mut samples {
                sample.timestamp = sample.timestamp.min(now_ms);
            }
            samples.sort_by_key(|s| s.timestamp);
            let key: String = labels.iter().map(|l| format!("{}\u{1}{}\u{2}", l.name, l.value)).collect();
            let (mut last, mut last_exemplar) = self.last_sent.get(&key).copied().unwrap_or((i64::MIN, i64::MIN));
            let before = samples.len();
            let mut stale = 0;
            samples.retain(|sample| {
                if sample.timestamp < oldest {
                    stale += 1;
                    return false;
                }
                let fresh = sample.timestamp > last;
                if fresh {
                    last = sample.timestamp;
                }
                fresh
            });
            prepared.stale += stale;
            prepared.out_of_order += (before - samples.len()) as u64 - stale;
            if samples.is_empty() {
                continue;
            }
            for exemplar in &mut exemplars {
                exemplar.timestamp = exemplar.timestamp.min(now_ms);
            }
            exemplars.sort_by_key(|e| e.timestamp);
            exemplars.retain(|exemplar| {
                let fresh = exemplar.timestamp > last_exemplar && exemplar.timestamp >= oldest;
                if fresh {
                    last_exemplar = exemplar.timestamp;
                }
                fresh
            });
            self.last_sent.insert(key, (last, last_exemplar));
            // Encoded size: labels (with their tags and lengths), 13 bytes per sample, about 64
            // per exemplar, the series' own tag and length.
            let bytes = labels.iter().map(|l| l.name.len() + l.value.len() + 9).sum::<usize>()
                + samples.len() * 13
                + exemplars.len() * 64
                + 8;
            let too_many = in_chunk + samples.len() > self.config.max_samples_per_send as usize;
            if in_chunk > 0 && (too_many || chunk_bytes + bytes > MAX_REQUEST_BYTES) {
                prepared.chunks.push(Vec::new());
                (in_chunk, chunk_bytes) = (0, 0);
            }
            in_chunk += samples.len();
            chunk_bytes += bytes;
            if let Some(chunk) = prepared.chunks.last_mut() {
                chunk.push(TimeSeries { labels, samples, exemplars });
            }
        }
        prepared
    }

    /// The destination's policy at the disk budget.
    pub fn when_full(&self) -> tailgate_config::WhenFull {
        self.config.when_full
    }

    /// Delivers one request's worth of queue batches (or waits out failures until stopped).
    pub async fn deliver(
        &mut self,
        ctx: &StageContext,
        consumer: Consumer,
        breaker: &mut isolate::Breaker,
        max_items: u64,
    ) -> Result<(), StageError> {
        let now_ms = (wall_now() / 1_000_000) as i64;
        let mut converted = Converted::default();
        let (cursor, last_seq, _) = {
            let rtxn = ctx.queue.read()?;
            super::read_batches(&ctx.queue, &rtxn, consumer, max_items, |_, value| {
                let source = batch::access_metrics(value)?;
                for request in source.requests.iter() {
                    match ExportMetricsServiceRequest::decode(request.as_slice()) {
                        Ok(request) => converted.add(&request, now_ms),
                        Err(_) => ctx.events.dropped("undecodable", 1),
                    }
                }
                Ok(u64::from(source.data_points.to_native()))
            })?
        };
        for (reason, points) in &converted.unsupported {
            ctx.events.dropped(reason, *points);
        }
        let prepared = self.prepare(converted, now_ms);
        ctx.events.dropped("stale", prepared.stale);
        ctx.events.dropped("out_of_order", prepared.out_of_order);
        if prepared.stale + prepared.out_of_order > 0 {
            tracing::debug!(
                stale = prepared.stale,
                out_of_order = prepared.out_of_order,
                "samples dropped before sending"
            );
        }
        let chunks = prepared.chunks;
        let retry_limit = (self.config.outage_policy == OutagePolicy::DropDuringOutage).then_some(2);
        let policy = isolate::Policy {
            retry_limit,
            persistent_after: None,
            yield_when_full: self.config.when_full == tailgate_config::WhenFull::DropOldest,
        };
        for chunk in &chunks {
            let delivered = isolate::deliver(
                ctx,
                consumer.as_str(),
                chunk,
                std::iter::once(0..chunk.len()).collect(),
                policy,
                breaker,
                async |part: &[TimeSeries]| self.push(part).await,
            )
            .await;
            if delivered.interrupted {
                return Ok(());
            }
            ctx.events.sent(delivered.accepted as u64);
            for (reason, series) in &delivered.refused {
                ctx.events.dropped(reason, *series as u64);
            }
            if !delivered.refused.is_empty() {
                tracing::warn!(consumer = consumer.as_str(), refused = ?delivered.refused, "remote write refused series; dropped them, sent the rest");
            }
        }
        super::commit_until_done(ctx, consumer, cursor, last_seq, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::proto::{Exemplar, Label, Sample};
    use super::*;

    #[test]
    fn samples_and_exemplars_of_a_series_go_out_in_time_order_once() {
        let config: RemoteWriteExporter =
            serde_json::from_value(serde_json::json!({ "endpoint": "http://127.0.0.1:9090/api/v1/write" })).unwrap();
        let mut sink = RemoteWriteSink::new(&config).unwrap();
        let labels = vec![Label { name: "__name__".into(), value: "x".into() }];
        let sample = |timestamp| Sample { value: 1.0, timestamp };
        let exemplar = |timestamp| Exemplar { labels: Vec::new(), value: 1.0, timestamp };
        let now = 10_000_000;
        let mut first = Converted::default();
        first.series.insert(
            labels.clone(),
            (vec![sample(now - 10), sample(now - 30), sample(now + 99)], vec![exemplar(now - 5), exemplar(now - 20)]),
        );
        let prepared = sink.prepare(first, now);
        let series = &prepared.chunks[0][0];
        let times: Vec<i64> = series.samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(times, vec![now - 30, now - 10, now], "sorted, the future clamped to now");
        let exemplar_times: Vec<i64> = series.exemplars.iter().map(|e| e.timestamp).collect();
        assert_eq!(exemplar_times, vec![now - 20, now - 5]);
        // Later deliveries: what is not newer than what was sent is dropped; so is the stale.
        let mut second = Converted::default();
        second
            .series
            .insert(labels, (vec![sample(now - 1), sample(now + 5), sample(now - 4_000_000)], vec![exemplar(now - 6)]));
        let prepared = sink.prepare(second, now + 10);
        assert_eq!((prepared.stale, prepared.out_of_order), (1, 1));
        let series = &prepared.chunks[0][0];
        assert_eq!(series.samples.iter().map(|s| s.timestamp).collect::<Vec<_>>(), vec![now + 5]);
        assert!(series.exemplars.is_empty());
    }

    #[test]
    fn requests_are_capped_by_encoded_size() {
        let config: RemoteWriteExporter = serde_json::from_value(serde_json::json!({
            "endpoint": "http://127.0.0.1:9090/api/v1/write", "max_samples_per_send": 1_000_000
        }))
        .unwrap();
        let mut sink = RemoteWriteSink::new(&config).unwrap();
        let mut converted = Converted::default();
        for n in 0..3000 {
            let labels = vec![
                Label { name: "__name__".into(), value: "x".into() },
                Label { name: "long".into(), value: format!("{n:0>2000}") },
            ];
            converted.series.insert(labels, (vec![Sample { value: 1.0, timestamp: 5 }], Vec::new()));
        }
        let prepared = sink.prepare(converted, 10);
        assert!(prepared.chunks.len() >= 3, "{} chunks", prepared.chunks.len());
        for chunk in &prepared.chunks {
            let encoded = WriteRequest { timeseries: chunk.clone() }.encode_to_vec().len();
            assert!(encoded <= MAX_REQUEST_BYTES + 4096, "{encoded} bytes");
        }
        assert_eq!(prepared.chunks.iter().map(Vec::len).sum::<usize>(), 3000);
    }

    #[test]
    fn prometheus_answers_are_classified_as_measured_on_2_42() {
        let refused = |status, body| match classify(status, body, None) {
            Attempt::Refused { reason, .. } => Some(reason),
            _ => None,
        };
        assert_eq!(refused(400, "out of order sample"), Some("out_of_order"));
        assert_eq!(refused(400, "out of bounds"), Some("out_of_bounds"));
        assert_eq!(refused(400, "duplicate sample for timestamp"), Some("duplicate_sample"));
        assert_eq!(refused(500, "too old sample"), Some("too_old"));
        for status in [429, 500, 503, 401, 404] {
            assert!(matches!(classify(status, "boom", None), Attempt::Retry { .. }), "{status}");
        }
        assert_eq!(classify(204, "", None), Attempt::Accepted);
    }
}
