//! spanmetrics: RED metrics over every decided span (kept or dropped), so calls and latencies
//! describe the real traffic; exemplars come only from spans of kept traces, so every exemplar
//! points at a trace that was exported. `spanmetrics.source: kept` counts kept spans only.
//!
//! Input is the `span_summaries` edge, which tail_sample writes in the transaction of each
//! decision: per step, what the decided spans add to each series (calls, sum, buckets, the
//! first kept spans as exemplars, backed by durable keep decisions), so every span is counted
//! once. Batches of per-span summaries written by earlier versions are still read.
//!
//! Metrics, as the Collector's spanmetrics connector names them: `traces.span.metrics.calls`
//! (cumulative monotonic sum) and `traces.span.metrics.duration` (cumulative histogram, ms,
//! explicit buckets), per `service.name`, `span.name`, `span.kind`, `status.code` and the
//! configured dimensions. At most `aggregation_cardinality_limit` series exist; spans of further
//! series count in one overflow series (`otel.metric.overflow: true`). Series idle for
//! `metrics_expiration` are forgotten.
//!
//! Exactly-once: summaries read since the last flush are counted in memory; a flush is one write
//! transaction that adds them to the durable series ([`series`]), appends the metrics batch and
//! moves the cursor. A restart re-counts exactly the unflushed summaries.

pub mod output;
pub mod series;

use std::collections::HashSet;
use std::hash::BuildHasher;

use crate::fast_map::FastMap;
use std::time::{Duration, Instant};

use prost::Message;
use tailgate_config::{SpanmetricsConfig, SpanmetricsSource};
use tailgate_ipc::batch::{self, ArchivedSeriesDelta, ArchivedSpanSummary, BatchKind, MetricBatch};
use tailgate_ipc::clock::wall_now;
use tailgate_ipc::{Consumer, Edge, Queue, QueueError};

use crate::context::{StageContext, StageError, wait_if_full};
use crate::limits::MAX_BATCHES_PER_STEP;
use series::{SERIES_PREFIX, SeriesKey, SeriesState};

/// The calls metric's name, as the Collector's spanmetrics connector names it.
pub const CALLS_METRIC: &str = "traces.span.metrics.calls";
/// The duration metric's name.
pub const DURATION_METRIC: &str = "traces.span.metrics.duration";

/// An exemplar: a span of a kept trace, with its duration.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// Span id.
    pub span_id: [u8; 8],
    /// Duration, ms.
    pub value_ms: f64,
    /// The span's end, Unix ns.
    pub time_unix_nano: u64,
}

/// What one series gained since the last flush.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    calls: u64,
    sum_ms: f64,
    buckets: Vec<u64>,
    exemplars: Vec<Exemplar>,
}

/// Counts read but not yet flushed.
#[derive(Debug)]
pub struct Accumulator {
    config: SpanmetricsConfig,
    /// Bucket bounds, ms.
    bounds: Vec<f64>,
    /// Series counted since the last flush, with what they gained.
    deltas: Vec<(SeriesKey, Delta)>,
    /// Hash of a series' fields (computed from the summary, without allocating) -> positions in
    /// `deltas`: the per-span lookup allocates only for a series new since the last flush.
    index: FastMap<u64, Vec<usize>>,
    /// Hashes a summary's series fields (seeded at random, like the index).
    hasher: foldhash::fast::RandomState,
    /// Encoded keys of the durable series (loaded at the first read).
    known: Option<HashSet<Vec<u8>>>,
    /// The cursor as this process last committed (or found) it; `None` before the first read.
    cursor: Option<u64>,
    /// Last `span_summaries` sequence number counted into `deltas`.
    read_pos: u64,
    /// Series in `deltas` that are not durable yet (count towards the limit).
    new_series: usize,
}

impl Accumulator {
    /// An empty accumulator for `config`.
    pub fn new(config: &SpanmetricsConfig) -> Accumulator {
        let bounds = config.histogram.explicit.buckets.iter().map(|b| b.0.as_secs_f64() * 1000.0).collect();
        Accumulator {
            config: config.clone(),
            bounds,
            deltas: Vec::new(),
            index: FastMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            known: None,
            cursor: None,
            read_pos: 0,
            new_series: 0,
        }
    }

    /// Counts summaries after `read_pos`. Returns (summaries read, whether more are waiting).
    pub fn read(&mut self, queue: &Queue) -> Result<(u64, bool), StageError> {
        let rtxn = queue.read()?;
        if self.cursor.is_none() {
            let cursor = queue.cursor(&rtxn, Consumer::Spanmetrics)?;
            self.cursor = Some(cursor);
            self.read_pos = cursor;
            let known = queue.state_prefix(&rtxn, SERIES_PREFIX)?.into_iter().map(|(k, _)| k.to_vec()).collect();
            self.known = Some(known);
        }
        let mut read = 0;
        for (batches, entry) in queue.entries_after(&rtxn, Edge::SpanSummaries, self.read_pos)?.enumerate() {
            if batches == MAX_BATCHES_PER_STEP {
                return Ok((read, true));
            }
            let (seq, value) = entry?;
            let corrupt = || QueueError::corrupt_at(Edge::SpanSummaries, seq);
            if batch::BatchHeader::parse(value).map_err(corrupt())?.kind == BatchKind::SeriesDeltas {
                let source = batch::access_series_deltas(value).map_err(corrupt())?;
                let bounds: Vec<f64> = source.bounds_ms.iter().map(|b| b.to_native()).collect();
                for delta in source.series.iter() {
                    read += self.add_delta(&bounds, delta);
                }
            } else {
                let source = batch::access_summaries(value).map_err(corrupt())?;
                for summary in source.summaries.iter() {
                    let service =
                        source.services.get(summary.service.to_native() as usize).map(|s| s.as_str()).unwrap_or("");
                    self.count(service, summary);
                }
                read += source.summaries.len() as u64;
            }
            self.read_pos = seq;
        }
        Ok((read, false))
    }

    /// Adds what tail_sample counted for one series in one step; returns the spans it counts.
    /// Counts bucketed under other bounds (the histogram changed while they waited in the
    /// queue) go to the bucket that holds their old bucket's upper bound.
    fn add_delta(&mut self, bounds: &[f64], delta: &ArchivedSeriesDelta) -> u64 {
        let dimensions: Vec<&str> = delta.dimensions.iter().map(|d| d.as_str()).collect();
        let slot =
            self.slot_of(delta.service.as_str(), delta.name.as_str(), delta.kind, delta.status_code, &dimensions);
        let same_bounds = bounds == self.bounds.as_slice();
        let calls = delta.calls.to_native();
        let counts = &mut self.deltas[slot].1;
        counts.calls += calls;
        counts.sum_ms += delta.sum_ms.to_native();
        for (index, count) in delta.buckets.iter().enumerate() {
            let bucket = if same_bounds {
                index
            } else {
                bounds.get(index).map_or(self.bounds.len(), |upper| batch::bucket_of(&self.bounds, *upper))
            };
            if let Some(total) = counts.buckets.get_mut(bucket) {
                *total += count.to_native();
            }
        }
        let exemplars = &self.config.exemplars;
        if exemplars.enabled {
            let room = (exemplars.max_per_data_point as usize).saturating_sub(counts.exemplars.len());
            counts.exemplars.extend(delta.exemplars.iter().take(room).map(|e| Exemplar {
                trace_id: e.trace_id,
                span_id: e.span_id,
                value_ms: e.value_ms.to_native(),
                time_unix_nano: e.time_unix_nano.to_native(),
            }));
        }
        calls
    }

    fn count(&mut self, service: &str, summary: &ArchivedSpanSummary) {
        if self.config.source == SpanmetricsSource::Kept && !summary.kept {
            return;
        }
        let dimensions: Vec<&str> = summary.dimensions.iter().map(|d| d.as_str()).collect();
        let slot = self.slot_of(service, summary.name.as_str(), summary.kind, summary.status_code, &dimensions);
        let value_ms = summary.duration_nanos.to_native() as f64 / 1e6;
        let bucket = batch::bucket_of(&self.bounds, value_ms);
        let delta = &mut self.deltas[slot].1;
        delta.calls += 1;
        delta.sum_ms += value_ms;
        delta.buckets[bucket] += 1;
        let exemplars = &self.config.exemplars;
        if exemplars.enabled && summary.kept && delta.exemplars.len() < exemplars.max_per_data_point as usize {
            delta.exemplars.push(Exemplar {
                trace_id: summary.trace_id,
                span_id: summary.span_id,
                value_ms,
                time_unix_nano: summary.end_unix_nano.to_native(),
            });
        }
    }

    /// The position in `deltas` of the summary's series (created if new, the overflow series if
    /// the cardinality limit is reached).
    fn slot_of(&mut self, service: &str, name: &str, kind: u8, status_code: u8, values: &[&str]) -> usize {
        use std::hash::{Hash, Hasher};
        let dimensions = || {
            self.config.dimensions.iter().zip(values.iter()).filter_map(|(dimension, value)| {
                let value = Some(*value).filter(|v| !v.is_empty()).or(dimension.default.as_deref())?;
                Some((dimension.name.as_str(), value))
            })
        };
        let mut hasher = self.hasher.build_hasher();
        (service, name, kind, status_code).hash(&mut hasher);
        for dimension in dimensions() {
            dimension.hash(&mut hasher);
        }
        let hash = hasher.finish();
        let matches = |key: &SeriesKey| {
            let mut wanted = dimensions();
            !key.overflow
                && key.service == service
                && key.span_name == name
                && key.kind == kind
                && key.status == status_code
                && key.dimensions.iter().all(|(n, v)| wanted.next().is_some_and(|(wn, wv)| wn == n && wv == v))
                && wanted.next().is_none()
        };
        if let Some(slot) = self.index.get(&hash).and_then(|slots| slots.iter().find(|s| matches(&self.deltas[**s].0)))
        {
            return *slot;
        }
        let key = SeriesKey {
            service: service.to_owned(),
            span_name: name.to_owned(),
            kind,
            status: status_code,
            dimensions: dimensions().map(|(n, v)| (n.to_owned(), v.to_owned())).collect(),
            overflow: false,
        };
        let (key, hash) = if self.admit(&key) { (key, hash) } else { (SeriesKey::overflow(), 0) };
        if key.overflow
            && let Some(slot) = self.deltas.iter().position(|(k, _)| k.overflow)
        {
            return slot;
        }
        let slot = self.deltas.len();
        self.deltas.push((key, Delta { buckets: vec![0; self.bounds.len() + 1], ..Delta::default() }));
        self.index.entry(hash).or_default().push(slot);
        slot
    }

    /// Whether `key` (not counted since the last flush) is a durable series or one more still
    /// fits under the cardinality limit (then it is counted as new).
    fn admit(&mut self, key: &SeriesKey) -> bool {
        let Some(known) = &self.known else { return true };
        if known.contains(&key.encode()) {
            return true;
        }
        if known.len() + self.new_series >= self.config.aggregation_cardinality_limit as usize {
            return false;
        }
        self.new_series += 1;
        true
    }

    /// Whether anything awaits a flush.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.cursor.is_none_or(|cursor| cursor == self.read_pos)
    }

    /// Series durable now.
    pub fn series(&self) -> usize {
        self.known.as_ref().map_or(0, HashSet::len)
    }

    /// Adds the deltas to the durable series, forgets idle series, writes the changed series'
    /// cumulative values as one metrics batch and moves the cursor, in one transaction. Returns
    /// the number of data points written.
    pub fn flush(&mut self, queue: &Queue, now_unix_nano: u64) -> Result<u32, StageError> {
        let cursor = self.cursor.unwrap_or(0);
        if self.deltas.is_empty() && cursor == self.read_pos {
            return Ok(0);
        }
        let mut wtxn = queue.write()?;
        if !queue.stage_may_write(&wtxn)? {
            // Export frees space first; the counts stay in memory (and in the queue) meanwhile.
            return Err(StageError::Queue(tailgate_ipc::QueueError::Full));
        }
        let bucket_count = self.bounds.len() + 1;
        let mut points = Vec::with_capacity(self.deltas.len());
        let mut added = Vec::new();
        for (key, delta) in &self.deltas {
            let state_key = key.encode();
            let mut state = queue
                .state_get(&wtxn, &state_key)?
                .and_then(|raw| SeriesState::decode(raw, bucket_count))
                .unwrap_or_else(|| SeriesState::new(now_unix_nano, bucket_count));
            state.last_seen_unix_nano = now_unix_nano;
            state.calls += delta.calls;
            state.sum_ms += delta.sum_ms;
            for (total, more) in state.buckets.iter_mut().zip(&delta.buckets) {
                *total += more;
            }
            queue.state_put(&mut wtxn, &state_key, &state.encode())?;
            added.push(state_key);
            points.push((key.clone(), state, delta.exemplars.clone()));
        }
        let expired = self.expire(queue, &mut wtxn, now_unix_nano)?;
        let data_points = (points.len() * 2) as u32;
        if !points.is_empty() {
            let request = output::request(&points, &self.bounds, now_unix_nano).encode_to_vec();
            let out = MetricBatch {
                received_unix_nano: tailgate_ipc::clock::pipeline_now(),
                requests: vec![request],
                data_points,
            };
            queue.append(&mut wtxn, Edge::Metrics, &batch::encode_metrics(&out)?)?;
        }
        queue.advance(&mut wtxn, Consumer::Spanmetrics, cursor, self.read_pos)?;
        queue.commit(wtxn)?;
        if let Some(known) = self.known.as_mut() {
            known.extend(added);
            for key in expired {
                known.remove(&key);
            }
        }
        self.cursor = Some(self.read_pos);
        self.deltas.clear();
        self.index.clear();
        self.new_series = 0;
        Ok(data_points)
    }

    /// Deletes series not updated for `metrics_expiration` (and not updated in this flush).
    fn expire(
        &self,
        queue: &Queue,
        wtxn: &mut tailgate_ipc::WriteTxn<'_>,
        now: u64,
    ) -> Result<Vec<Vec<u8>>, StageError> {
        let expiration = self.config.metrics_expiration.as_nanos() as u64;
        if expiration == 0 {
            return Ok(Vec::new());
        }
        let bucket_count = self.bounds.len() + 1;
        let mut doomed = Vec::new();
        for (key, value) in queue.state_prefix(wtxn, SERIES_PREFIX)? {
            let idle = SeriesState::decode(value, bucket_count)
                .is_none_or(|state| now.saturating_sub(state.last_seen_unix_nano) > expiration);
            if idle {
                doomed.push(key.to_vec());
            }
        }
        for key in &doomed {
            queue.state_delete(wtxn, key)?;
        }
        Ok(doomed)
    }
}

/// Runs the stage: counts as summaries arrive, flushes every `metrics_flush_interval`, and once
/// more when told to stop.
pub async fn run(mut ctx: StageContext) -> Result<(), StageError> {
    let interval = ctx.config.spanmetrics.metrics_flush_interval;
    let mut accumulator = Accumulator::new(&ctx.config.spanmetrics);
    let mut next_flush = Instant::now() + interval;
    let mut full_streak = 0;
    while !ctx.stopping() {
        ctx.beat();
        if ctx.take_shed_request() {
            // Flush at once (counts leave memory for the queue); the series stay: they are
            // cumulative.
            next_flush = Instant::now();
            crate::context::shed_done(tailgate_ipc::memory::private_bytes(), "flushed early");
        }
        let (read, more) = accumulator.read(&ctx.queue)?;
        ctx.events.received(read);
        if Instant::now() >= next_flush {
            match accumulator.flush(&ctx.queue, wall_now()) {
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
        // Sleep until woken by new summaries; only wake for a flush when something is pending.
        let timeout = (!accumulator.is_empty()).then(|| next_flush.saturating_duration_since(Instant::now()));
        ctx.idle(timeout.map(|t| t + Duration::from_millis(1))).await;
    }
    let points = accumulator.flush(&ctx.queue, wall_now())?;
    if points > 0 {
        ctx.waker.edge_written(Edge::Metrics);
    }
    tracing::info!(series = accumulator.series(), "spanmetrics stopping");
    ctx.events.log_summary();
    Ok(())
}

#[cfg(test)]
mod tests;
