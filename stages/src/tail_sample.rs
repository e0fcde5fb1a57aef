//! tail_sample: buffers spans by trace until the trace is complete (root span seen plus
//! `root_grace`) or `decision_wait` has passed since its first span, then keeps it if any span
//! is in ERROR status or lasted longer than `latency_threshold`, and drops it otherwise.
//!
//! State lives in the queue, not in this process:
//! - the in-memory index holds `(seq, index)` references into the `spans` edge, never copies;
//!   kept spans are copied out of the map only when their trace is decided;
//! - the input cursor advances only past batches whose spans are all decided, so those batches
//!   stay in the queue while any of their traces is pending;
//! - `tail_sample/read_pos` (meta) records how far input was ingested; every decision is written
//!   to the decisions table in the same transaction that emits the trace's spans;
//! - after a restart the batches between the cursor and `read_pos` are re-read: a span whose
//!   trace has a decision was already handled (emitted or dropped) and is skipped, every other
//!   span is buffered again with its original receive time. Nothing is lost or emitted twice.
//!
//! A span arriving after its trace was decided follows the decision (emitted or dropped in the
//! step that ingests it) and extends the decision's `last_seq`.
//!
//! Every time here (receive stamps, due times, decision stamps) is pipeline time
//! ([`tailgate_ipc::clock`]): it never jumps when the wall clock is stepped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tailgate_ipc::batch::{self, ArchivedSpanBatch};
use tailgate_ipc::decisions::{Decision, PruneRule, SAMPLER_READ_POS_KEY, SamplerWatermark};
use tailgate_ipc::{Consumer, Edge, Queue, QueueError, ReadTxn, StageId};

use crate::context::{StageContext, StageError, wait_if_full};
use crate::fast_map::FastMap;
use tailgate_ipc::clock::{pipeline_now, wall_now};

pub mod adaptive;
pub mod incident;
mod output;
mod pending;
pub mod policies;
pub mod summaries;
use crate::limits::{MAX_BATCHES_PER_STEP, MAX_DECISIONS_PER_STEP, MAX_PRUNE_PER_STEP, MIN_STEP_INTERVAL, StepSizer};
use output::StepOutput;
use pending::PendingTrace;
use summaries::{COUNTING_KEY, Counting};

/// The trace map is left alone below this capacity (a steady load's index).
const COMPACT_ABOVE_CAPACITY: usize = 16_384;

/// Due traces taken out of the index together (see [`Sampler::decide`]): 64 rather than 16
/// overlapped more of the removals' cache misses (2.5% CPU per span at 500k spans/s).
const DECIDE_CHUNK: usize = 64;

/// How often the stage, when it has caught up, shrinks an index a burst left oversized.
const COMPACT_INTERVAL: Duration = Duration::from_secs(10);

/// The sampling rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Decide this long after a trace's first span at the latest.
    pub decision_wait: Duration,
    /// Decide this long after the root span arrived.
    pub root_grace: Duration,
    /// An error span is known to keep its trace (a top-level `status_code` policy with ERROR):
    /// what shedding decides early on.
    pub keep_errors: bool,
    /// A span this long is known to keep its trace (the lowest top-level `latency` policy).
    pub latency_threshold: Duration,
    /// The sampling policies, evaluated on the whole trace when it is decided.
    pub policies: Vec<tailgate_config::PolicyConfig>,
    /// Remember decisions this long.
    pub decision_cache_ttl: Duration,
    /// Remember keep decisions this long.
    pub kept_decision_ttl: Duration,
    /// How the decided spans are counted for spanmetrics.
    pub spanmetrics: summaries::SeriesSettings,
    /// A trace with this many pending spans is decided at once.
    pub max_spans_per_trace: u32,
    /// Estimated heap of the pending index above which the traces due soonest are decided early.
    pub max_pending_bytes: u64,
}

/// Estimated heap of one pending trace in the index, besides its span references: its map
/// entry (id, due, receive time, the policies' facts, flags, its first run of spans), its place
/// in the due set, and allocator overhead. Measured: 183 bytes per trace of 3 spans in all (BENCHMARKS.md), against
/// 232 estimated.
pub const PENDING_TRACE_BYTES: u64 = 160;
/// Estimated heap of one pending span reference: nothing while a trace's spans come in one run,
/// a run (batch sequence, first index, count) and vector growth for a span that starts another;
/// counted for every span, so the estimate errs on the safe side.
pub const PENDING_SPAN_BYTES: u64 = 24;

impl Policy {
    /// When a trace whose first span was received at `received` is due without its root.
    fn wait_due(&self, received: u64) -> u64 {
        received.saturating_add(self.decision_wait.as_nanos() as u64)
    }

    /// When a trace is due once its root arrived (received at `received`).
    fn root_due(&self, received: u64) -> u64 {
        received.saturating_add(self.root_grace.as_nanos() as u64)
    }

    /// The policy configured in `config.tail_sample` (and spanmetrics' dimensions).
    pub fn from_config(config: &tailgate_config::Config) -> Policy {
        let sampling = &config.tail_sample;
        Policy {
            decision_wait: sampling.decision_wait,
            root_grace: sampling.root_grace,
            keep_errors: sampling.keeps_errors(),
            latency_threshold: sampling.latency_keeps_from().unwrap_or(Duration::MAX),
            policies: sampling.policies.clone(),
            decision_cache_ttl: sampling.decision_cache_ttl,
            kept_decision_ttl: sampling.kept_decision_ttl,
            spanmetrics: summaries::SeriesSettings::from_config(config),
            max_spans_per_trace: sampling.max_spans_per_trace,
            max_pending_bytes: sampling.max_pending_bytes.0,
        }
    }
}

/// The sampler's in-memory index, rebuilt from the queue at start.
#[derive(Debug)]
pub struct Sampler {
    policy: Policy,
    policies: policies::Policies,
    /// The open incident window, read at every step.
    incident: Option<incident::Incident>,
    traces: FastMap<[u8; 16], PendingTrace>,
    /// (due time, trace id) of every pending trace.
    due: BTreeSet<(u64, [u8; 16])>,
    /// Pending traces per receive time of their first span: the watermark's oldest pending.
    first_received: BTreeMap<u64, u32>,
    /// Undecided spans per ingested batch; the cursor passes a batch when its count is 0.
    undecided: BTreeMap<u64, u32>,
    /// Batches past the cursor this process has checked in full when it ingested them: read
    /// again (to decide their traces in a later step), they are not checked again.
    checked: BTreeMap<u64, batch::SeenBatch>,
    cursor: u64,
    read_pos: u64,
    /// `read_pos` as persisted at start: batches up to it were handled before a restart.
    replay_until: u64,
    /// Replayed spans skipped because their trace was decided before the restart.
    replay_skipped: u64,
    /// Replayed spans buffered again (their trace was still pending).
    replay_buffered: u64,
    /// `read_pos` as last committed.
    persisted_read_pos: u64,
    /// Receive time of the last batch ingested, Unix nanoseconds.
    ingested_until: u64,
    /// Most bytes a step reads (its output is at most about as large); see [`StepSizer`].
    step_limit: usize,
    /// Span references in the index (for the memory estimate).
    pending_spans: u64,
    /// Traces made due early (giant, or over the index budget) and not counted yet.
    decided_early: u64,
    /// Where the last scan for expired drop decisions stopped.
    prune_frontier: Option<Vec<u8>>,
    /// Where spans are counted for spanmetrics, and whether that is stored yet.
    counting: Counting,
    counting_stored: bool,
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepReport {
    /// Spans ingested.
    pub ingested: u64,
    /// Spans written to `kept_spans`.
    pub kept: u64,
    /// Spans dropped by the policy.
    pub dropped: u64,
    /// Traces decided.
    pub decided: u64,
    /// Whether more input is waiting (the step stopped at its batch limit).
    pub more_input: bool,
    /// Whether span metrics (counts or exemplars) were written for spanmetrics.
    pub metrics_written: bool,
    /// The queue is above the stage threshold: nothing was done.
    pub blocked: bool,
    /// The step committed a write transaction.
    pub wrote: bool,
    /// Traces made due before their time because they were giant or the index was over its
    /// budget.
    pub decided_early: u64,
    /// Spans that arrived after their trace was decided (they followed the decision).
    pub late: u64,
}

impl Sampler {
    /// Loads the cursor and ingestion position from the queue.
    pub fn open(queue: &Queue, policy: Policy) -> Result<Sampler, StageError> {
        let rtxn = queue.read()?;
        let cursor = queue.cursor(&rtxn, Consumer::TailSample)?;
        let replay_until = queue.meta_u64(&rtxn, SAMPLER_READ_POS_KEY)?.unwrap_or(0).max(cursor);
        let mut policies = policies::Policies::new(&policy.policies, policy.keep_errors, policy.latency_threshold);
        policies.resume_thresholds(&queue.route_thresholds(&rtxn)?, &policy.policies);
        let stored_counting = queue.meta_u64(&rtxn, COUNTING_KEY)?;
        let counting = Counting::resume(&policy.spanmetrics, stored_counting, replay_until);
        Ok(Sampler {
            counting_stored: stored_counting == Some(counting.encode()),
            counting,
            policies,
            incident: None,
            policy,
            traces: FastMap::default(),
            due: BTreeSet::new(),
            first_received: BTreeMap::new(),
            undecided: BTreeMap::new(),
            checked: BTreeMap::new(),
            cursor,
            read_pos: cursor,
            replay_until,
            replay_skipped: 0,
            replay_buffered: 0,
            persisted_read_pos: replay_until,
            ingested_until: 0,
            step_limit: queue.max_step_bytes(),
            pending_spans: 0,
            decided_early: 0,
            prune_frontier: None,
        })
    }

    /// Sheds memory (the stage is over its soft budget): every pending trace already known to be
    /// kept (an error or a slow span seen) becomes due now, so the next steps decide it and free
    /// its spans; a late span of it follows the cached decision and is kept too, so nothing
    /// changes for it. Traces not known to be kept yet keep waiting: a late error span could
    /// still make them kept. The index then gives back the capacity a burst left. Returns how
    /// many traces were made due.
    pub fn shed(&mut self) -> usize {
        let mut early = 0;
        for (trace_id, trace) in self.traces.iter_mut().filter(|(_, trace)| trace.interesting) {
            if trace.due_unix_nano > 0 {
                self.due.remove(&(trace.due_unix_nano, *trace_id));
                trace.due_unix_nano = 0;
                self.due.insert((0, *trace_id));
                early += 1;
            }
        }
        self.traces.shrink_to_fit();
        for trace in self.traces.values_mut() {
            trace.spans.shrink_to_fit();
        }
        early
    }

    /// Gives back what a burst left: the trace map's capacity once at most a quarter of it is
    /// in use (the ordered indexes free their nodes as they go). Returns whether it shrank.
    pub fn compact(&mut self) -> bool {
        let capacity = self.traces.capacity();
        if capacity <= COMPACT_ABOVE_CAPACITY || self.traces.len() > capacity / 4 {
            return false;
        }
        self.traces.shrink_to(self.traces.len().saturating_mul(2));
        self.traces.capacity() < capacity
    }

    /// Estimated heap of the pending index.
    pub fn pending_bytes(&self) -> u64 {
        self.traces.len() as u64 * PENDING_TRACE_BYTES + self.pending_spans * PENDING_SPAN_BYTES
    }

    /// Keeps the index within `max_pending_bytes`: traces already due now count as leaving; then
    /// the traces due soonest are made due now until the rest fits. They are decided on the
    /// spans they have (a late span follows that decision), in this step or the next ones.
    fn enforce_pending_budget(&mut self) {
        let mut estimate = self.pending_bytes();
        let max = self.policy.max_pending_bytes;
        if estimate <= max {
            return;
        }
        let bytes_of = |trace: &PendingTrace| PENDING_TRACE_BYTES + u64::from(trace.span_count) * PENDING_SPAN_BYTES;
        let mut early = Vec::new();
        for &(due, trace_id) in &self.due {
            if estimate <= max {
                break;
            }
            let Some(trace) = self.traces.get(&trace_id) else { continue };
            estimate = estimate.saturating_sub(bytes_of(trace));
            if due > 0 {
                early.push((due, trace_id));
            }
        }
        for (due, trace_id) in early {
            self.due.remove(&(due, trace_id));
            self.due.insert((0, trace_id));
            if let Some(trace) = self.traces.get_mut(&trace_id) {
                trace.due_unix_nano = 0;
            }
            self.decided_early += 1;
        }
    }

    /// Traces currently buffered.
    pub fn pending_traces(&self) -> usize {
        self.traces.len()
    }

    /// When the earliest pending trace is due, Unix nanoseconds.
    pub fn next_due(&self) -> Option<u64> {
        self.due.first().map(|(due, _)| *due)
    }

    /// Sets the most bytes a step reads and the size of its output batches ([`StepSizer`]).
    pub fn set_step_limit(&mut self, bytes: usize) {
        self.step_limit = bytes;
    }

    /// Ingests new input, decides due traces, and commits the result in one write transaction.
    /// On error the in-memory index may be ahead of the queue: the process must exit and
    /// rebuild from the queue (the supervisor restarts it).
    pub fn step(&mut self, queue: &Queue, now_unix_nano: u64) -> Result<StepReport, StageError> {
        let mut report = StepReport::default();
        let mut output = StepOutput::new(self.step_limit);
        let rtxn = queue.read()?;
        if !queue.stage_may_write(&rtxn)? {
            report.blocked = true;
            return Ok(report);
        }
        let incident = incident::load(queue, &rtxn)?.filter(|i| i.open_at(wall_now() / 1_000_000));
        if incident != self.incident {
            match &incident {
                Some(i) => {
                    tracing::info!(routes = ?i.routes, keep_all = i.keep_all, latency_ms = ?i.latency_ms, until_unix_ms = i.until_unix_ms, "incident window open")
                }
                None => tracing::info!("incident window closed"),
            }
            self.incident = incident;
        }
        if let Some(adaptive) = self.policies.adaptive() {
            for change in adaptive.tick(now_unix_nano) {
                let quantile_ms = (change.quantile_ms != u64::MAX).then_some(change.quantile_ms);
                let what = if change.to_ms > change.from_ms { "lifted" } else { "stepped back" };
                tracing::info!(
                    route = %change.route,
                    from_ms = change.from_ms,
                    to_ms = change.to_ms,
                    quantile_ms = ?quantile_ms,
                    "adaptive latency threshold {what}"
                );
            }
        }
        self.ingest(queue, &rtxn, now_unix_nano, &mut output, &mut report)?;
        self.enforce_pending_budget();
        report.decided_early = std::mem::take(&mut self.decided_early);
        // While replaying, a trace may still have spans in batches not re-read yet: deciding it
        // now would judge it on part of its spans and then skip the rest as already handled.
        if self.read_pos >= self.replay_until {
            // With input backing up (a backlog after a restart or a burst), decide only what is
            // due by the receive time of the last batch read: later spans of those traces, still
            // unread, would otherwise arrive as late spans of a trace judged without them.
            let decide_at = if report.more_input { now_unix_nano.min(self.ingested_until) } else { now_unix_nano };
            // Stops at the step's output limit and asks for another step (more_input).
            self.decide(queue, &rtxn, decide_at, now_unix_nano, &mut output, &mut report)?;
        }
        let output = output.finish(&self.policy.spanmetrics, now_unix_nano)?;
        drop(rtxn);
        let old_cursor = self.cursor;
        self.advance_cursor();
        // Never move the persisted position back: batches up to `replay_until` were handled
        // before the restart, and a crash during the replay must still know that.
        let read_pos = self.read_pos.max(self.replay_until);
        let thresholds_changed = self.policies.adaptive().is_some_and(|a| a.is_dirty());
        if output.decisions.is_empty()
            && output.summaries.is_empty()
            && old_cursor == self.cursor
            && read_pos == self.persisted_read_pos
            && !thresholds_changed
        {
            // Nothing to write; in particular no write at all while replaying, so a full queue
            // cannot stop the replay that leads to the decisions that free it.
            return Ok(report);
        }
        let mut wtxn = queue.write()?;
        crate::fault::in_write_txn(&queue_run_dir(queue));
        queue.advance(&mut wtxn, Consumer::TailSample, old_cursor, self.cursor)?;
        if read_pos != self.persisted_read_pos {
            queue.set_meta_u64(&mut wtxn, SAMPLER_READ_POS_KEY, read_pos)?;
        }
        if !self.counting_stored {
            queue.set_meta_u64(&mut wtxn, COUNTING_KEY, self.counting.encode())?;
        }
        // Only ingesting and deciding change the watermark, and both lead here.
        queue.set_sampler_watermark(&mut wtxn, &self.watermark())?;
        if let Some(thresholds) = self.policies.adaptive().and_then(|a| a.take_dirty()) {
            queue.set_route_thresholds(&mut wtxn, &thresholds)?;
        }
        for kept in &output.kept_spans {
            queue.append(&mut wtxn, Edge::KeptSpans, kept)?;
        }
        for summaries in &output.summaries {
            queue.append(&mut wtxn, Edge::SpanSummaries, summaries)?;
        }
        report.metrics_written = !output.summaries.is_empty();
        // In key order: neighbouring puts touch the same pages.
        let mut decisions: Vec<(&[u8; 16], &(Decision, bool))> = output.decisions.iter().collect();
        decisions.sort_unstable_by_key(|(trace_id, _)| **trace_id);
        for (trace_id, (decision, stored)) in decisions {
            if *stored {
                queue.put_decision(&mut wtxn, trace_id, decision)?;
            } else {
                queue.put_new_decision(&mut wtxn, trace_id, decision)?;
            }
        }
        // Logs still waiting in the queue may need older decisions: measure the TTL from how far
        // log_mirror has got, not from now.
        let mut horizon = now_unix_nano;
        if queue.depth(&wtxn, Edge::Logs)?.batches > 0 {
            let progress = queue.meta_u64(&wtxn, tailgate_ipc::decisions::LOG_MIRROR_PROGRESS_KEY)?.unwrap_or(0);
            horizon = horizon.min(progress);
        }
        let before_ms = |ttl: Duration| horizon.saturating_sub(ttl.as_nanos() as u64) / 1_000_000;
        let rule = PruneRule {
            drops_before_ms: before_ms(self.policy.decision_cache_ttl),
            all_before_ms: before_ms(self.policy.kept_decision_ttl),
            cursor: self.cursor,
            limit: MAX_PRUNE_PER_STEP,
        };
        queue.prune_decisions_by(&mut wtxn, &rule, &mut self.prune_frontier)?;
        queue.commit(wtxn)?;
        self.persisted_read_pos = read_pos;
        self.counting_stored = true;
        report.wrote = true;
        Ok(report)
    }

    /// How far the sampler has got (published for log_mirror).
    pub fn watermark(&self) -> SamplerWatermark {
        SamplerWatermark {
            oldest_pending: self.first_received.keys().next().copied().unwrap_or(u64::MAX),
            ingested_until: self.ingested_until,
        }
    }

    fn ingest<'t>(
        &mut self,
        queue: &Queue,
        rtxn: &'t ReadTxn<'_>,
        now_unix_nano: u64,
        output: &mut StepOutput<'t>,
        report: &mut StepReport,
    ) -> Result<(), StageError> {
        let mut batches = 0;
        let mut bytes = 0usize;
        let max_bytes = output.step_limit;
        let now = pipeline_now();
        for entry in queue.entries_after(rtxn, Edge::Spans, self.read_pos)? {
            if batches == MAX_BATCHES_PER_STEP || bytes >= max_bytes {
                report.more_input = true;
                break;
            }
            let (seq, value) = entry?;
            bytes += value.len();
            let (batch, seen) = batch::access_spans_seen(value).map_err(QueueError::corrupt_at(Edge::Spans, seq))?;
            output.sources.insert(seq, batch);
            if let Some(seen) = seen {
                self.checked.insert(seq, seen);
            }
            let replaying = seq <= self.replay_until;
            // A trace due before this batch was received is decided before the batch is read,
            // as it would have been had the sampler been running then: a backlog (after downtime
            // or a stop) is judged in receive time, not by what happens to be queued.
            if !replaying && self.read_pos >= self.replay_until {
                let due_by = batch.received_unix_nano.to_native().min(now).saturating_sub(1);
                if !self.decide(queue, rtxn, due_by, now_unix_nano, output, report)? {
                    // The step's output is full: this batch waits for the next step, after the
                    // traces due before it are decided.
                    report.more_input = true;
                    break;
                }
            }
            // A clock stepped backwards must not postpone decisions by the size of the step.
            let received = batch.received_unix_nano.to_native().min(now);
            let count_here = !replaying && self.counting.counted_at_ingest(seq);
            // The index is far larger than the caches and trace ids are random: a first pass
            // looks every trace of the batch up, so those cache misses overlap (the lookups do
            // not depend on one another) instead of stalling the loop below one by one.
            let mut previous = [0u8; 16];
            for span in batch.spans.iter() {
                if span.trace_id != previous {
                    previous = span.trace_id;
                    std::hint::black_box(self.traces.get(&previous));
                }
            }
            let mut observer = self.policies.observer(batch);
            let mut undecided = 0u32;
            for (index, span) in batch.spans.iter().enumerate() {
                let index = index as u32;
                let trace_id = span.trace_id;
                let trace = match self.traces.entry(trace_id) {
                    std::collections::hash_map::Entry::Occupied(entry) => {
                        let trace = entry.into_mut();
                        trace.push(seq, index);
                        trace
                    }
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        // A late span (or, when replaying, one handled before the restart).
                        if let Some(decided) = Self::decided(queue, rtxn, output, &trace_id)? {
                            if replaying {
                                self.replay_skipped += 1;
                                continue;
                            }
                            report.late += 1;
                            let mark = decided.0.policy.and_then(|policy| self.policies.mark(usize::from(policy)));
                            let settings = &self.policy.spanmetrics;
                            if output.follow(settings, seq, batch, index, trace_id, decided, mark) {
                                report.kept += 1;
                            } else {
                                report.dropped += 1;
                            }
                            continue;
                        }
                        // A trace that starts with its root is due by the root's grace from the
                        // start (one place in the due set, not one taken and given up at once).
                        let due = if span.parent_span_id == [0u8; 8] {
                            self.policy.wait_due(received).min(self.policy.root_due(received))
                        } else {
                            self.policy.wait_due(received)
                        };
                        self.due.insert((due, trace_id));
                        *self.first_received.entry(received).or_default() += 1;
                        entry.insert(PendingTrace::new(due, received, seq, index))
                    }
                };
                observer.observe(&mut trace.facts, index);
                if count_here {
                    output.summarize(&self.policy.spanmetrics, batch, index, true, false);
                }
                undecided += 1;
                if replaying {
                    self.replay_buffered += 1;
                }
                self.pending_spans += 1;
                if Self::buffered(&self.policy, &mut self.due, trace, received, span) {
                    self.decided_early += 1;
                }
            }
            self.undecided.insert(seq, undecided);
            self.read_pos = seq;
            self.ingested_until = received;
            if seq == self.replay_until && replaying {
                tracing::info!(
                    through = seq,
                    skipped_handled = self.replay_skipped,
                    rebuffered = self.replay_buffered,
                    "rebuilt sampler state from the queue"
                );
            }
            report.ingested += batch.spans.len() as u64;
            batches += 1;
        }
        Ok(())
    }

    /// The decision for a trace not in the index: one made in this step, or a stored one.
    fn decided(
        queue: &Queue,
        rtxn: &ReadTxn<'_>,
        output: &StepOutput<'_>,
        trace_id: &[u8; 16],
    ) -> Result<Option<(Decision, bool)>, StageError> {
        if let Some(decision) = output.decisions.get(trace_id) {
            return Ok(Some(*decision));
        }
        Ok(queue.decision(rtxn, trace_id)?.map(|decision| (decision, true)))
    }

    /// Updates a trace's due time for the span just added to it (received at `received`): a
    /// root makes it due by the root's grace, `max_spans_per_trace` makes it due now. Returns
    /// whether it was made due early.
    fn buffered(
        policy: &Policy,
        due: &mut BTreeSet<(u64, [u8; 16])>,
        trace: &mut PendingTrace,
        received: u64,
        span: &batch::ArchivedSpanRecord,
    ) -> bool {
        let trace_id = span.trace_id;
        let duration = batch::span_duration(span.start_unix_nano.to_native(), span.end_unix_nano.to_native());
        trace.interesting |= (policy.keep_errors && span.status_code == batch::STATUS_CODE_ERROR)
            || duration > policy.latency_threshold.as_nanos() as u64;
        if trace.span_count >= policy.max_spans_per_trace && trace.due_unix_nano > 0 {
            due.remove(&(trace.due_unix_nano, trace_id));
            trace.due_unix_nano = 0;
            due.insert((0, trace_id));
            return true;
        }
        let root_due = policy.root_due(received);
        if span.parent_span_id == [0u8; 8] && root_due < trace.due_unix_nano {
            due.remove(&(trace.due_unix_nano, trace_id));
            trace.due_unix_nano = root_due;
            due.insert((root_due, trace_id));
        }
        false
    }

    /// Decides every pending trace due by `due_by` (receive-time clock); decisions are stamped
    /// with `now_unix_nano`. Returns false when it stopped at the step's output limit.
    fn decide<'t>(
        &mut self,
        queue: &Queue,
        rtxn: &'t ReadTxn<'_>,
        due_by: u64,
        now_unix_nano: u64,
        output: &mut StepOutput<'t>,
        report: &mut StepReport,
    ) -> Result<bool, StageError> {
        let mut taken: Vec<([u8; 16], PendingTrace)> = Vec::new();
        loop {
            let due_now = self.due.first().is_some_and(|&(due, _)| due <= due_by);
            if !due_now {
                return Ok(true);
            }
            if output.emitted >= output.step_limit || output.decisions.len() >= MAX_DECISIONS_PER_STEP {
                report.more_input = true;
                return Ok(false);
            }
            // The due traces leave the index a few at a time, before any is decided: the
            // removals do not depend on one another, so the processor overlaps their cache
            // misses (the index is far larger than the caches; a trace is removed seconds after
            // it was inserted).
            let room = (MAX_DECISIONS_PER_STEP - output.decisions.len()).min(DECIDE_CHUNK);
            let mut ids = [[0u8; 16]; DECIDE_CHUNK];
            let mut count = 0;
            while count < room
                && let Some(&(due, trace_id)) = self.due.first()
                && due <= due_by
            {
                self.due.pop_first();
                ids[count] = trace_id;
                count += 1;
            }
            taken.extend(ids[..count].iter().filter_map(|id| Some((*id, self.traces.remove(id)?))));
            for (trace_id, trace) in taken.drain(..) {
                self.decide_trace(queue, rtxn, trace_id, trace, now_unix_nano, output, report)?;
            }
        }
    }

    /// Decides one trace taken out of the index: the kept spans emitted and offered as
    /// exemplars, the decision recorded.
    #[allow(clippy::too_many_arguments)]
    fn decide_trace<'t>(
        &mut self,
        queue: &Queue,
        rtxn: &'t ReadTxn<'_>,
        trace_id: [u8; 16],
        trace: PendingTrace,
        now_unix_nano: u64,
        output: &mut StepOutput<'t>,
        report: &mut StepReport,
    ) -> Result<(), StageError> {
        self.pending_spans = self.pending_spans.saturating_sub(u64::from(trace.span_count));
        if let Some(count) = self.first_received.get_mut(&trace.first_received) {
            *count -= 1;
            if *count == 0 {
                self.first_received.remove(&trace.first_received);
            }
        }
        let mut last_seq = 0;
        for run in trace.spans.runs() {
            self.settle(run.seq, run.count);
            last_seq = last_seq.max(run.seq);
        }
        // The policies judge the facts gathered as the spans were ingested; the spans are read
        // again only for a route, or when the trace is kept (emitted, exemplars) or its spans
        // are counted now ([`Counting`]).
        let mut root_route = None;
        if self.policies.needs_route(self.incident.as_ref()) {
            for (seq, index) in trace.spans.spans() {
                let source = self.source(queue, rtxn, &mut output.sources, seq)?;
                if let Some(span) = source.spans.get(index as usize).filter(|s| s.parent_span_id == [0u8; 8]) {
                    root_route = Some(policies::root_route(span));
                }
            }
        }
        let kept_by = self.policies.decide_during(&trace_id, &trace.facts, root_route, self.incident.as_ref());
        let keep = kept_by.is_some();
        let mark = kept_by.and_then(|policy| self.policies.mark(policy));
        let settings = &self.policy.spanmetrics;
        let count_now = |seq: u64| !self.counting.counted_at_ingest(seq) && (keep || !settings.kept_only);
        for run in trace.spans.runs() {
            let count = count_now(run.seq);
            if !keep && !count {
                continue;
            }
            let source = self.source(queue, rtxn, &mut output.sources, run.seq)?;
            for index in run.index..run.index + run.count {
                output.summarize(settings, source, index, count, keep);
                if keep {
                    output.emit(run.seq, source, index, mark);
                }
            }
        }
        let spans = u64::from(trace.span_count);
        if keep {
            report.kept += spans
        } else {
            report.dropped += spans
        }
        report.decided += 1;
        let policy = kept_by.and_then(|index| u8::try_from(index).ok());
        let decision = Decision { keep, decided_unix_ms: now_unix_nano / 1_000_000, last_seq, policy };
        output.decisions.insert(trace_id, (decision, false));
        Ok(())
    }

    /// `count` spans of batch `seq` were decided.
    fn settle(&mut self, seq: u64, count: u32) {
        if let Some(undecided) = self.undecided.get_mut(&seq) {
            *undecided = undecided.saturating_sub(count);
        }
    }

    /// Batch `seq`, opened once per step: checked in full the first time this process reads it
    /// (when it is ingested), not again after that ([`batch::access_spans_again`]).
    fn source<'t>(
        &self,
        queue: &Queue,
        rtxn: &'t ReadTxn<'_>,
        sources: &mut FastMap<u64, &'t ArchivedSpanBatch>,
        seq: u64,
    ) -> Result<&'t ArchivedSpanBatch, StageError> {
        if let Some(source) = sources.get(&seq) {
            return Ok(source);
        }
        let value = queue
            .get(rtxn, Edge::Spans, seq)?
            .ok_or_else(|| StageError::Other(format!("spans batch {seq} vanished while referenced")))?;
        let source = match self.checked.get(&seq) {
            Some(seen) => batch::access_spans_again(value, seen),
            None => batch::access_spans(value),
        }
        .map_err(QueueError::corrupt_at(Edge::Spans, seq))?;
        sources.insert(seq, source);
        Ok(source)
    }

    fn advance_cursor(&mut self) {
        while let Some((&seq, &count)) = self.undecided.first_key_value() {
            if count > 0 {
                break;
            }
            self.undecided.pop_first();
            self.cursor = seq;
        }
        while self.checked.first_key_value().is_some_and(|(&seq, _)| seq <= self.cursor) {
            self.checked.pop_first();
        }
    }
}

/// Runs the stage: steps whenever woken or when the next trace is due.
pub async fn run(mut ctx: StageContext) -> Result<(), StageError> {
    let mut sampler = Sampler::open(&ctx.queue, Policy::from_config(&ctx.config))?;
    tracing::info!(cursor = sampler.cursor, replay_until = sampler.replay_until, "tail_sample started");
    let mut full_streak = 0;
    let mut over_budget = false;
    let mut sizer = StepSizer::default();
    let mut compacted_at = std::time::Instant::now();
    crate::fault::bloat_at_start(&queue_run_dir(&ctx.queue));
    while !ctx.stopping() {
        ctx.beat();
        crate::fault::hang_in_step(&queue_run_dir(&ctx.queue)).await;
        crate::fault::bloat(&queue_run_dir(&ctx.queue));
        if ctx.take_shed_request() {
            let before = tailgate_ipc::memory::private_bytes();
            let early = sampler.shed();
            crate::context::shed_done(
                before,
                &format!("{early} pending traces already kept decided early, index shrunk"),
            );
        }
        let stepped_at = std::time::Instant::now();
        sampler.set_step_limit(sizer.limit(&ctx.queue));
        let report = match sampler.step(&ctx.queue, pipeline_now()) {
            Ok(report) => report,
            Err(err) => {
                wait_if_full(&ctx, err, &mut full_streak).await?;
                sizer.shrink(&ctx.queue);
                // The index ran ahead of the queue in the failed step: rebuild it from the queue.
                ctx.rebuilding();
                sampler = Sampler::open(&ctx.queue, Policy::from_config(&ctx.config))?;
                continue;
            }
        };
        // Only a write says the map had room again (a replay after a failed step writes nothing).
        if report.wrote {
            full_streak = 0;
        }
        sizer.stepped(&ctx.queue, report.wrote);
        if report.blocked {
            ctx.wait_for_budget(&mut over_budget).await;
            continue;
        }
        ctx.budget_resumed(&mut over_budget);
        ctx.events.received(report.ingested);
        ctx.events.sent(report.kept);
        ctx.events.dropped("sampled_out", report.dropped);
        if report.late > 0 {
            ctx.events.errors("late_span", report.late);
        }
        if report.decided_early > 0 {
            ctx.events.errors("trace_decided_early", report.decided_early);
            tracing::debug!(
                traces = report.decided_early,
                "traces decided early (giant, or the index over max_pending_bytes)"
            );
        }
        if report.kept > 0 {
            ctx.waker.edge_written(Edge::KeptSpans);
        }
        if report.decided > 0 {
            ctx.waker.wake(StageId::LogMirror);
        }
        if report.metrics_written {
            ctx.waker.edge_written(Edge::SpanSummaries);
        }
        if report.more_input {
            continue;
        }
        // Caught up: after a burst the index holds far more capacity than the load needs; give
        // it back (the process's heap trimmer, `ipc::memory::spawn_trimmer`, returns the pages).
        if compacted_at.elapsed() >= COMPACT_INTERVAL {
            compacted_at = std::time::Instant::now();
            if sampler.compact() {
                tracing::debug!(pending = sampler.pending_traces(), "index shrunk after a burst");
            }
        }
        let timeout = sampler
            .next_due()
            .map(|due| Duration::from_nanos(due.saturating_sub(pipeline_now())) + Duration::from_millis(1));
        ctx.idle_paced(timeout, stepped_at, MIN_STEP_INTERVAL).await;
    }
    tracing::info!(pending_traces = sampler.pending_traces(), "tail_sample stopping; pending traces stay queued");
    ctx.events.log_summary();
    Ok(())
}

/// The run directory (wake sockets, locks, fault triggers) of the queue's data directory.
fn queue_run_dir(queue: &Queue) -> std::path::PathBuf {
    tailgate_ipc::wake::socket_dir(queue.path().parent().unwrap_or(queue.path()))
}

#[cfg(test)]
mod tests;
