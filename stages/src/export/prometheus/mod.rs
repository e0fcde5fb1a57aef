//! The Prometheus remote-write exporter: one consumer of `metrics` (span metrics and received
//! OTLP metrics), pushing remote write 1.0 (protobuf + snappy) with exemplars.
//!
//! A delivery reads queue batches after the cursor, converts their OTLP requests into series
//! ([`convert`]), then per series: orders samples by time, clamps timestamps in the future to
//! now, drops samples older than `max_sample_age` (`stale`) and samples not newer than the last
//! one this process sent for the series (`out_of_order`), and sends the series in requests of at
//! most `max_samples_per_send` samples.
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

use super::http::{HttpSetup, retry_after};
use super::isolate::{self, Attempt};
use crate::context::{StageContext, StageError, unix_nanos_now};
use convert::Converted;
use proto::{TimeSeries, WriteRequest};

/// Series remembered for ordering; beyond this the memory starts over.
const MAX_TRACKED_SERIES: usize = 200_000;

/// A remote-write destination.
#[derive(Debug)]
pub struct RemoteWriteSink {
    config: RemoteWriteExporter,
    http: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    /// Last sample time sent per series (labels joined), Unix ms.
    last_sent: HashMap<String, i64>,
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
        let setup = HttpSetup { headers: &config.headers, auth: config.auth.as_ref(), timeout: config.timeout };
        let (http, headers) =
            setup.build(None).map_err(|err| StageError::Other(format!("remote write exporter: {err}")))?;
        Ok(RemoteWriteSink { config: config.clone(), http, headers, last_sent: HashMap::new() })
    }

    async fn push(&self, series: &[TimeSeries]) -> Attempt {
        let request = WriteRequest { timeseries: series.to_vec() }.encode_to_vec();
        let body = match snap::raw::Encoder::new().compress_vec(&request) {
            Ok(body) => body,
            Err(err) => return Attempt::Refused { reason: "encoding", message: err.to_string() },
        };
        let sent = self
            .http
            .post(&self.config.endpoint)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .header(reqwest::header::CONTENT_ENCODING, "snappy")
            .header("x-prometheus-remote-write-version", "0.1.0")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => return Attempt::Retry { message: format!("transport: {err}"), after: None },
        };
        let status = response.status().as_u16();
        let after = retry_after(&response);
        let body = if (200..300).contains(&status) { String::new() } else { response.text().await.unwrap_or_default() };
        classify(status, &body, after)
    }

    /// Orders, filters and batches the series of one delivery; counts what it drops.
    fn prepare(&mut self, converted: Converted, ctx: &StageContext) -> Vec<Vec<TimeSeries>> {
        let now_ms = (unix_nanos_now() / 1_000_000) as i64;
        let oldest = if self.config.max_sample_age.is_zero() {
            i64::MIN
        } else {
            now_ms - self.config.max_sample_age.as_millis() as i64
        };
        let (mut stale, mut out_of_order) = (0u64, 0u64);
        if self.last_sent.len() > MAX_TRACKED_SERIES {
            self.last_sent.clear();
        }
        let mut chunks: Vec<Vec<TimeSeries>> = vec![Vec::new()];
        let mut in_chunk = 0usize;
        for (labels, (mut samples, mut exemplars)) in converted.series {
            for sample in &mut samples {
                sample.timestamp = sample.timestamp.min(now_ms);
            }
            samples.sort_by_key(|s| s.timestamp);
            let key: String = labels.iter().map(|l| format!("{}\u{1}{}\u{2}", l.name, l.value)).collect();
            let mut last = self.last_sent.get(&key).copied().unwrap_or(i64::MIN);
            let before = samples.len();
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
            out_of_order += (before - samples.len()) as u64;
            if samples.is_empty() {
                continue;
            }
            self.last_sent.insert(key, last);
            for exemplar in &mut exemplars {
                exemplar.timestamp = exemplar.timestamp.min(now_ms);
            }
            if in_chunk + samples.len() > self.config.max_samples_per_send as usize && in_chunk > 0 {
                chunks.push(Vec::new());
                in_chunk = 0;
            }
            in_chunk += samples.len();
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(TimeSeries { labels, samples, exemplars });
            }
        }
        let out_of_order = out_of_order.saturating_sub(stale);
        ctx.events.dropped("stale", stale);
        ctx.events.dropped("out_of_order", out_of_order);
        if stale + out_of_order > 0 {
            tracing::debug!(stale, out_of_order, "samples dropped before sending");
        }
        chunks
    }

    /// Delivers one request's worth of queue batches (or waits out failures until stopped).
    pub async fn deliver(&mut self, ctx: &StageContext, consumer: Consumer, max_items: u64) -> Result<(), StageError> {
        let now_ms = (unix_nanos_now() / 1_000_000) as i64;
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
        let chunks = self.prepare(converted, ctx);
        let retry_limit = (self.config.outage_policy == OutagePolicy::DropDuringOutage).then_some(2);
        for chunk in &chunks {
            let delivered =
                isolate::deliver(ctx, consumer.as_str(), chunk, retry_limit, async |part: &[TimeSeries]| {
                    self.push(part).await
                })
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
    use super::*;

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
