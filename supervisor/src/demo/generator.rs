//! The demo's load: the field report's profile ([`crate::workload`]) sent to the receiver over
//! OTLP/gRPC, each trace's JSON log lines appended to a file the file input tails, and the
//! ground truth of what the default sampling must keep.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

use super::sinks::ItemId;
use crate::workload::{Ramp, Trace, Workload, log_lines, request};

/// Most spans per export request (an SDK's batch size).
const BATCH_SPANS: usize = 512;
/// How often the users' finished traces are sent.
const TICK: Duration = Duration::from_millis(100);
/// Attempts per request refused by the receiver (push-back), 200 ms apart.
const ATTEMPTS: u32 = 25;

/// Running counts, read by the live view.
#[derive(Debug, Default)]
pub struct Counts {
    pub traces: AtomicU64,
    pub spans: AtomicU64,
    pub lines: AtomicU64,
    /// Spans of traces the default sampling must keep.
    pub keep_worthy_spans: AtomicU64,
    /// Spans the receiver refused for good (after every attempt): not part of the truth.
    pub refused_spans: AtomicU64,
}

/// What the generator sent: the traces that must be kept and how much went in.
#[derive(Debug, Default)]
pub struct Truth {
    /// Traces the default sampling must keep (errors or slow).
    pub kept: Vec<Trace>,
    pub spans_sent: u64,
    pub lines_written: u64,
}

impl Truth {
    /// Every span (and so every log line: one per span) of the traces that must be kept.
    pub fn kept_ids(&self) -> impl Iterator<Item = ItemId> + '_ {
        self.kept.iter().flat_map(|trace| (0..trace.spans()).map(|index| (trace.trace_id, trace.span_id(index))))
    }
}

/// The generator's settings.
#[derive(Debug, Clone)]
pub struct Load {
    pub receiver: SocketAddr,
    pub log_file: PathBuf,
    pub ramp: Ramp,
    pub duration: Duration,
    pub seed: u64,
}

/// Sends the profile until `load.duration` has passed or `stop` is set.
pub async fn run(load: Load, counts: Arc<Counts>, stop: Arc<AtomicBool>) -> anyhow::Result<Truth> {
    let mut client = TraceServiceClient::connect(format!("http://{}", load.receiver)).await?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&load.log_file)?;
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let mut workload = Workload::new(run_id, load.seed);
    let mut truth = Truth::default();
    let started = Instant::now();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = 0.0f64;
    let mut text = String::new();
    while started.elapsed() < load.duration && !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        due += load.ramp.users_at(started.elapsed()) * TICK.as_secs_f64();
        let count = due.floor() as usize;
        due -= count as f64;
        let traces: Vec<Trace> = (0..count).map(|_| workload.trace()).collect();
        let mut at = 0;
        while at < traces.len() {
            let (mut spans, mut until) = (0usize, at);
            while until < traces.len() && (until == at || spans + traces[until].spans() as usize <= BATCH_SPANS) {
                spans += traces[until].spans() as usize;
                until += 1;
            }
            let chunk = &traces[at..until];
            at = until;
            let end = SystemTime::now().duration_since(UNIX_EPOCH)?;
            counts.traces.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if !send(&mut client, request(chunk, end.as_nanos() as u64), &stop).await {
                counts.refused_spans.fetch_add(spans as u64, Ordering::Relaxed);
                continue;
            }
            // The lines of accepted traces only, written once their spans are in: the truth
            // stays exact even when the receiver refuses a request.
            text.clear();
            for trace in chunk {
                log_lines(trace, end.as_millis() as u64, &mut text);
                if trace.keep().is_some() {
                    counts.keep_worthy_spans.fetch_add(u64::from(trace.spans()), Ordering::Relaxed);
                    truth.kept.push(trace.clone());
                }
            }
            file.write_all(text.as_bytes())?;
            truth.spans_sent += spans as u64;
            truth.lines_written += spans as u64;
            counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
            counts.lines.fetch_add(spans as u64, Ordering::Relaxed);
        }
    }
    file.flush()?;
    Ok(truth)
}

/// Exports one request as an SDK does: retried (with a deadline per attempt) on push-back and
/// on transport failures, given up on a refusal of the request itself; whether it was
/// accepted. A retry after a lost answer can deliver a request twice (at-least-once, as with
/// any OTLP client): only a killed receive loses answers.
async fn send(
    client: &mut TraceServiceClient<tonic::transport::Channel>,
    request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    stop: &AtomicBool,
) -> bool {
    for _ in 0..ATTEMPTS {
        match tokio::time::timeout(Duration::from_secs(5), client.export(request.clone())).await {
            Ok(Ok(_)) => return true,
            Ok(Err(status)) if matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::Unimplemented) => {
                return false;
            }
            Ok(Err(_)) | Err(_) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    false
}
