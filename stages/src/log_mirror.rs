//! log_mirror: a log record is kept iff its trace was kept (1:1 on trace_id). A record without a
//! trace id is judged by the sampler's own rule on its fields: kept at ERROR severity or above,
//! or when the duration it reports is over the latency threshold.
//!
//! Waiting follows the sampler's real progress, not this process's clock: a record received at
//! `R` whose trace has no decision waits until tail_sample has decided every span received up to
//! `R + max_wait` ([`Queue::decided_through`]); only then is it judged on its own and counted as
//! `decision_timeout`. While tail_sample is down, restarting or replaying a backlog, records wait.
//! A record that waits holds up nobody: records are resolved one by one, in any order.
//!
//! Exactly-once: batches are read in order up to `log_mirror/read_pos`. Every read batch the
//! cursor has not passed has a bitmap of its resolved records in the `state` table
//! (`log_mirror/batch/<seq>`), written in the transaction that emits those records; the cursor
//! passes a batch once all its records are resolved, in the transaction that resolves the last
//! one. A restart rebuilds the waiting index from the batches between cursor and `read_pos` and
//! their bitmaps. Decisions come from the decisions table tail_sample writes; new ones are found
//! by scanning its decision-time index from the newest time seen (tail_sample's clock only moves
//! forward across its commits), and a record is looked up once more before it times out.

use std::collections::BTreeMap;

use crate::fast_map::FastMap;
use std::time::Duration;

use tailgate_ipc::batch::{self, ArchivedLogBatch, LogBatch, SEVERITY_NUMBER_ERROR, SubsetBuilder};
use tailgate_ipc::clock::pipeline_now;
use tailgate_ipc::decisions::{LOG_MIRROR_PROGRESS_KEY, RouteThresholds};
use tailgate_ipc::{Consumer, Edge, Queue, QueueError, ReadTxn};

use crate::context::{StageContext, StageError, wait_if_full};
use crate::limits::{LOG_STEP_INTERVAL, MAX_BATCHES_PER_STEP, MAX_OUTPUT_BATCH_BYTES, StepSizer};
use crate::otlp_wire::{AttributeValue, LOG_RECORD_ATTRIBUTES, find_attribute};

/// Meta key of the last `logs` sequence number read.
const READ_POS_KEY: &str = "log_mirror/read_pos";
/// State key prefix of the resolved-records bitmaps.
const BITMAP_PREFIX: &[u8] = b"log_mirror/batch/";

/// The rule for records judged on their own fields.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// How far past a record's receipt the sampler must have decided everything before the
    /// record gives up on its trace.
    pub max_wait: Duration,
    /// Keep records at ERROR severity or above.
    pub keep_errors: bool,
    /// Keep records reporting a duration above this.
    pub latency_threshold: Duration,
}

impl Rule {
    /// The rule of the configuration (log_mirror's wait, tail_sample's keep rule).
    pub fn from_config(config: &tailgate_config::Config) -> Rule {
        Rule {
            max_wait: config.log_mirror.max_wait,
            keep_errors: config.tail_sample.keeps_errors(),
            latency_threshold: config.tail_sample.latency_keeps_from().unwrap_or(Duration::MAX),
        }
    }

    /// Whether a record judged alone is kept: ERROR or above, or a duration over the latency
    /// threshold — the one an adaptive `latency` policy has lifted for the record's `http.route`
    /// attribute, if it did (`routes`), as tail_sample judges that route's traces.
    fn keeps(&self, log: &batch::ArchivedLogEntry, routes: &RouteThresholds) -> bool {
        if self.keep_errors && log.severity_number >= SEVERITY_NUMBER_ERROR {
            return true;
        }
        let mut threshold = self.latency_threshold.as_nanos() as u64;
        if !routes.routes.is_empty()
            && let Some(AttributeValue::Str(route)) =
                find_attribute(log.body.as_slice(), LOG_RECORD_ATTRIBUTES, "http.route")
            && let Some(ms) = routes.routes.get(route)
        {
            threshold = ms.saturating_mul(1_000_000);
        }
        log.duration_nanos.to_native() > threshold
    }
}

/// Counts of one step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MirrorReport {
    /// Records read from the `logs` edge.
    pub received: u64,
    /// Records written to `kept_logs`.
    pub kept: u64,
    /// Records whose trace was dropped.
    pub dropped_trace: u64,
    /// Records without trace id that the rule does not keep.
    pub dropped_untraced: u64,
    /// Records judged on their own because their trace's decision did not come in time.
    pub decision_timeout: u64,
    /// Records still waiting for their trace's decision.
    pub waiting: u64,
    /// Whether the step stopped at its batch limit.
    pub more_input: bool,
    /// The queue is above the stage threshold: nothing was done.
    pub blocked: bool,
    /// The step committed a write transaction.
    pub wrote: bool,
}

/// A batch read but not yet passed by the cursor.
#[derive(Debug)]
struct Pending {
    received: u64,
    /// One bit per record: resolved (emitted or dropped).
    resolved: Vec<u8>,
    unresolved: u32,
    /// Whether its bitmap is stored.
    stored: bool,
    /// Whether its bitmap changed since it was stored.
    dirty: bool,
}

impl Pending {
    fn is_resolved(&self, index: u32) -> bool {
        self.resolved.get(index as usize / 8).is_some_and(|byte| byte & (1 << (index % 8)) != 0)
    }

    fn resolve(&mut self, index: u32) {
        if let Some(byte) = self.resolved.get_mut(index as usize / 8)
            && *byte & (1 << (index % 8)) == 0
        {
            *byte |= 1 << (index % 8);
            self.unresolved -= 1;
            self.dirty = true;
        }
    }
}

fn bitmap_key(seq: u64) -> Vec<u8> {
    [BITMAP_PREFIX, &seq.to_be_bytes()].concat()
}

/// What a step resolved, to be committed together.
#[derive(Default)]
struct StepOutput {
    /// Output batches are sealed at this many bytes of payload.
    batch_limit: usize,
    builder: SubsetBuilder,
    kept: Vec<batch::LogEntry>,
    kept_bytes: usize,
    full: Vec<LogBatch>,
}

impl StepOutput {
    fn emit(&mut self, seq: u64, source: &ArchivedLogBatch, index: u32) {
        let Some(log) = source.logs.get(index as usize) else { return };
        // Seal before a record would take the batch past the limit.
        if !self.kept.is_empty() && self.kept_bytes + log.body.len() > self.batch_limit {
            self.seal();
        }
        let scope = self.builder.scope(seq, log.scope.to_native(), &source.resources, &source.scopes);
        self.kept_bytes += log.body.len();
        self.kept.push(batch::own_log(log, scope));
    }

    fn seal(&mut self) {
        if self.kept.is_empty() {
            return;
        }
        let (resources, scopes) = self.builder.take();
        let logs = std::mem::take(&mut self.kept);
        self.kept_bytes = 0;
        self.full.push(LogBatch { received_unix_nano: pipeline_now(), resources, scopes, logs });
    }
}

/// log_mirror's index of waiting records, rebuilt from the queue at start.
#[derive(Debug)]
pub struct Mirror {
    rule: Rule,
    /// Latency thresholds lifted per route by an adaptive policy (read at every step).
    routes: RouteThresholds,
    cursor: u64,
    read_pos: u64,
    persisted_read_pos: u64,
    /// Read batches the cursor has not passed.
    pending: BTreeMap<u64, Pending>,
    /// Waiting records by trace.
    waiting: FastMap<[u8; 16], Vec<(u64, u32)>>,
    /// Decision time (Unix ms) up to which new decisions were looked at.
    decisions_seen_ms: u64,
    /// Stored bitmaps of batches the cursor passed in this step, to delete.
    passed_stored: Vec<u64>,
    /// Most bytes a step reads, and the size of its output batches; see [`StepSizer`].
    step_limit: usize,
}

impl Mirror {
    /// Loads the cursor and read position and rebuilds the waiting index from the stored bitmaps.
    pub fn open(queue: &Queue, rule: Rule) -> Result<Mirror, StageError> {
        let rtxn = queue.read()?;
        let cursor = queue.cursor(&rtxn, Consumer::LogMirror)?;
        let read_pos = queue.meta_u64(&rtxn, READ_POS_KEY)?.unwrap_or(0).max(cursor);
        let mut mirror = Mirror {
            rule,
            routes: RouteThresholds::default(),
            cursor,
            read_pos,
            persisted_read_pos: read_pos,
            pending: BTreeMap::new(),
            waiting: FastMap::default(),
            decisions_seen_ms: 0,
            passed_stored: Vec::new(),
            step_limit: queue.max_step_bytes(),
        };
        for entry in queue.entries_after(&rtxn, Edge::Logs, cursor)? {
            let (seq, value) = entry?;
            if seq > read_pos {
                break;
            }
            let source = batch::access_logs(value).map_err(QueueError::corrupt_at(Edge::Logs, seq))?;
            let records = source.logs.len();
            let stored = queue.state_get(&rtxn, &bitmap_key(seq))?;
            let mut resolved = vec![0u8; records.div_ceil(8)];
            if let Some(bits) = stored.filter(|bits| bits.len() == resolved.len()) {
                resolved.copy_from_slice(bits);
            }
            let mut state = Pending {
                received: source.received_unix_nano.to_native(),
                resolved,
                unresolved: records as u32,
                stored: stored.is_some(),
                dirty: false,
            };
            let done = (0..records as u32).filter(|index| state.is_resolved(*index)).count() as u32;
            state.unresolved -= done;
            for (index, log) in source.logs.iter().enumerate() {
                if !state.is_resolved(index as u32) {
                    mirror.waiting.entry(log.trace_id).or_default().push((seq, index as u32));
                }
            }
            mirror.pending.insert(seq, state);
        }
        Ok(mirror)
    }

    /// Records waiting for a decision.
    pub fn waiting_records(&self) -> usize {
        self.waiting.values().map(Vec::len).sum()
    }

    /// Receive time of the oldest batch with a waiting record.
    pub fn oldest_waiting(&self) -> Option<u64> {
        self.pending.values().filter(|p| p.unresolved > 0).map(|p| p.received).min()
    }

    /// Gives back the capacity a burst left in the waiting index. Waiting records are not judged
    /// early: their trace's decision is what keeps logs and traces 1:1.
    pub fn shed(&mut self) {
        self.waiting.shrink_to_fit();
        for records in self.waiting.values_mut() {
            records.shrink_to_fit();
        }
        self.passed_stored.shrink_to_fit();
    }

    /// Sets the most bytes a step reads and the size of its output batches ([`StepSizer`]).
    pub fn set_step_limit(&mut self, bytes: usize) {
        self.step_limit = bytes;
    }

    /// Reads new batches, resolves what can be resolved, commits kept records, bitmaps and the
    /// cursor in one write transaction. On error the index may be ahead of the queue: reopen.
    pub fn step(&mut self, queue: &Queue, now_unix_nano: u64) -> Result<MirrorReport, StageError> {
        let mut report = MirrorReport::default();
        let mut output = StepOutput {
            batch_limit: self.step_limit.min(MAX_OUTPUT_BATCH_BYTES),
            builder: SubsetBuilder::default(),
            kept: Vec::new(),
            kept_bytes: 0,
            full: Vec::new(),
        };
        let rtxn = queue.read()?;
        if !queue.stage_may_write(&rtxn)? {
            report.blocked = true;
            return Ok(report);
        }
        let decided_through = queue.decided_through(&rtxn, now_unix_nano)?;
        self.routes = queue.route_thresholds(&rtxn)?;
        let mut changed = self.ingest(queue, &rtxn, decided_through, &mut output, &mut report)?;
        changed |= self.resolve_new_decisions(queue, &rtxn, &mut output, &mut report)?;
        changed |= self.time_out(queue, &rtxn, decided_through, &mut output, &mut report)?;
        let progress = self.oldest_waiting().unwrap_or_else(|| self.last_received(queue, &rtxn));
        drop(rtxn);
        report.waiting = self.waiting_records() as u64;
        if !changed {
            return Ok(report);
        }
        let old_cursor = self.cursor;
        self.advance_cursor();
        let mut wtxn = queue.write()?;
        queue.advance(&mut wtxn, Consumer::LogMirror, old_cursor, self.cursor)?;
        if self.read_pos != self.persisted_read_pos {
            queue.set_meta_u64(&mut wtxn, READ_POS_KEY, self.read_pos)?;
        }
        queue.set_meta_u64(&mut wtxn, LOG_MIRROR_PROGRESS_KEY, progress)?;
        for seq in self.passed_stored.drain(..) {
            queue.state_delete(&mut wtxn, &bitmap_key(seq))?;
        }
        for (seq, state) in self.pending.iter_mut().filter(|(_, state)| state.dirty || !state.stored) {
            queue.state_put(&mut wtxn, &bitmap_key(*seq), &state.resolved)?;
            state.stored = true;
            state.dirty = false;
        }
        output.seal();
        for out in &output.full {
            report.kept += out.logs.len() as u64;
            queue.append(&mut wtxn, Edge::KeptLogs, &batch::encode_logs(out)?)?;
        }
        queue.commit(wtxn)?;
        self.persisted_read_pos = self.read_pos;
        report.wrote = true;
        Ok(report)
    }

    fn last_received(&self, queue: &Queue, rtxn: &ReadTxn<'_>) -> u64 {
        let value = queue.get(rtxn, Edge::Logs, self.read_pos).ok().flatten();
        value.and_then(|v| batch::access_logs(v).ok()).map(|b| b.received_unix_nano.to_native()).unwrap_or(0)
    }

    /// Reads batches after `read_pos`: resolves what it can, indexes the rest as waiting.
    fn ingest(
        &mut self,
        queue: &Queue,
        rtxn: &ReadTxn<'_>,
        decided_through: u64,
        output: &mut StepOutput,
        report: &mut MirrorReport,
    ) -> Result<bool, StageError> {
        let mut read = 0;
        let mut bytes = 0usize;
        let max_bytes = self.step_limit;
        for entry in queue.entries_after(rtxn, Edge::Logs, self.read_pos)? {
            if read == MAX_BATCHES_PER_STEP || bytes >= max_bytes {
                report.more_input = true;
                break;
            }
            read += 1;
            let (seq, value) = entry?;
            bytes += value.len();
            let source = batch::access_logs(value).map_err(QueueError::corrupt_at(Edge::Logs, seq))?;
            let records = source.logs.len();
            let received = source.received_unix_nano.to_native();
            let timed_out = decided_through >= received.saturating_add(self.rule.max_wait.as_nanos() as u64);
            let mut state = Pending {
                received,
                resolved: vec![0u8; records.div_ceil(8)],
                unresolved: records as u32,
                stored: false,
                dirty: true,
            };
            for (index, log) in source.logs.iter().enumerate() {
                let index = index as u32;
                if log.trace_id == [0u8; 16] {
                    self.judge_alone(seq, source, index, output, report);
                    state.resolve(index);
                    continue;
                }
                if !timed_out && let Some(records) = self.waiting.get_mut(&log.trace_id) {
                    // An earlier record of this trace waits: its decision was not made when that
                    // record was looked up, so it is either not made yet or made since the last
                    // scan, and `resolve_new_decisions` (later in this step, same snapshot)
                    // resolves every waiting record of the trace. No lookup needed.
                    records.push((seq, index));
                    continue;
                }
                match queue.decision(rtxn, &log.trace_id)? {
                    Some(decision) => self.follow(decision.keep, seq, source, index, output, report),
                    None if timed_out => {
                        report.decision_timeout += 1;
                        self.judge_alone(seq, source, index, output, report);
                    }
                    None => {
                        self.waiting.entry(log.trace_id).or_default().push((seq, index));
                        continue;
                    }
                }
                state.resolve(index);
            }
            report.received += records as u64;
            self.pending.insert(seq, state);
            self.read_pos = seq;
        }
        Ok(read > 0)
    }

    /// Resolves waiting records whose trace was decided since the last look.
    fn resolve_new_decisions(
        &mut self,
        queue: &Queue,
        rtxn: &ReadTxn<'_>,
        output: &mut StepOutput,
        report: &mut MirrorReport,
    ) -> Result<bool, StageError> {
        if self.waiting.is_empty() {
            // Nothing waits: every record read so far was checked against this snapshot, so
            // only decisions made after it can matter to records read later.
            self.decisions_seen_ms = queue.last_decision_ms(rtxn)?.unwrap_or(self.decisions_seen_ms);
            return Ok(false);
        }
        let mut changed = false;
        // Each batch is opened (its checksum and structure checked) once, not once per record
        // resolved in it: that was half of the stage's CPU at the field report's load.
        let mut opened: FastMap<u64, &ArchivedLogBatch> = FastMap::default();
        for new in queue.decisions_since(rtxn, self.decisions_seen_ms)? {
            self.decisions_seen_ms = self.decisions_seen_ms.max(new.decided_unix_ms);
            let Some(records) = self.waiting.remove(&new.trace_id) else { continue };
            let keep = match new.keep {
                Some(keep) => keep,
                None => queue.decision(rtxn, &new.trace_id)?.is_some_and(|d| d.keep),
            };
            for (seq, index) in records {
                let source = match opened.get(&seq) {
                    Some(source) => *source,
                    None => *opened.entry(seq).or_insert(load(queue, rtxn, seq)?),
                };
                self.follow(keep, seq, source, index, output, report);
                if let Some(state) = self.pending.get_mut(&seq) {
                    state.resolve(index);
                }
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Judges on their own the waiting records of batches the sampler has passed by `max_wait`
    /// (after one more look for a decision).
    fn time_out(
        &mut self,
        queue: &Queue,
        rtxn: &ReadTxn<'_>,
        decided_through: u64,
        output: &mut StepOutput,
        report: &mut MirrorReport,
    ) -> Result<bool, StageError> {
        let max_wait = self.rule.max_wait.as_nanos() as u64;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, state)| state.unresolved > 0 && decided_through >= state.received.saturating_add(max_wait))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &expired {
            let source = load(queue, rtxn, *seq)?;
            for (index, log) in source.logs.iter().enumerate() {
                let index = index as u32;
                if self.pending.get(seq).is_none_or(|state| state.is_resolved(index)) {
                    continue;
                }
                if let Some(records) = self.waiting.get_mut(&log.trace_id) {
                    records.retain(|record| *record != (*seq, index));
                    if records.is_empty() {
                        self.waiting.remove(&log.trace_id);
                    }
                }
                match queue.decision(rtxn, &log.trace_id)? {
                    Some(decision) => self.follow(decision.keep, *seq, source, index, output, report),
                    None => {
                        report.decision_timeout += 1;
                        self.judge_alone(*seq, source, index, output, report);
                    }
                }
                if let Some(state) = self.pending.get_mut(seq) {
                    state.resolve(index);
                }
            }
        }
        Ok(!expired.is_empty())
    }

    fn follow(
        &self,
        keep: bool,
        seq: u64,
        source: &ArchivedLogBatch,
        index: u32,
        output: &mut StepOutput,
        report: &mut MirrorReport,
    ) {
        if keep {
            output.emit(seq, source, index);
        } else {
            report.dropped_trace += 1;
        }
    }

    fn judge_alone(
        &self,
        seq: u64,
        source: &ArchivedLogBatch,
        index: u32,
        output: &mut StepOutput,
        report: &mut MirrorReport,
    ) {
        match source.logs.get(index as usize) {
            Some(log) if self.rule.keeps(log, &self.routes) => output.emit(seq, source, index),
            _ => report.dropped_untraced += 1,
        }
    }

    /// Moves the cursor past the leading fully resolved batches.
    fn advance_cursor(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().unresolved > 0 {
                break;
            }
            let (seq, state) = entry.remove_entry();
            if state.stored {
                self.passed_stored.push(seq);
            }
            self.cursor = seq;
        }
    }
}

fn load<'t>(queue: &Queue, rtxn: &'t ReadTxn<'_>, seq: u64) -> Result<&'t ArchivedLogBatch, StageError> {
    let value = queue
        .get(rtxn, Edge::Logs, seq)?
        .ok_or_else(|| StageError::Other(format!("logs batch {seq} vanished while referenced")))?;
    Ok(batch::access_logs(value).map_err(QueueError::corrupt_at(Edge::Logs, seq))?)
}

/// Runs the stage: steps when woken (new logs, new decisions) and while records wait for the
/// sampler to move on.
pub async fn run(mut ctx: StageContext) -> Result<(), StageError> {
    let rule = Rule::from_config(&ctx.config);
    let mut mirror = Mirror::open(&ctx.queue, rule)?;
    tracing::info!(waiting = mirror.waiting_records(), "log_mirror started");
    let mut full_streak = 0;
    let mut over_budget = false;
    let mut sizer = StepSizer::default();
    while !ctx.stopping() {
        ctx.beat();
        if ctx.take_shed_request() {
            let before = tailgate_ipc::memory::private_bytes();
            mirror.shed();
            crate::context::shed_done(before, "waiting-record index shrunk");
        }
        let stepped_at = std::time::Instant::now();
        mirror.set_step_limit(sizer.limit(&ctx.queue));
        let report = match mirror.step(&ctx.queue, pipeline_now()) {
            Ok(report) => report,
            Err(err) => {
                wait_if_full(&ctx, err, &mut full_streak).await?;
                sizer.shrink(&ctx.queue);
                // The index ran ahead of the queue in the failed step: rebuild it.
                ctx.rebuilding();
                mirror = Mirror::open(&ctx.queue, rule)?;
                continue;
            }
        };
        // Only a write says the map had room again (a rebuilt index writes nothing at first).
        if report.wrote {
            full_streak = 0;
        }
        sizer.stepped(&ctx.queue, report.wrote);
        if report.blocked {
            ctx.wait_for_budget(&mut over_budget).await;
            continue;
        }
        ctx.budget_resumed(&mut over_budget);
        ctx.events.received(report.received);
        ctx.events.sent(report.kept);
        ctx.events.dropped("trace_dropped", report.dropped_trace);
        ctx.events.dropped("untraced_not_kept", report.dropped_untraced);
        if report.decision_timeout > 0 {
            ctx.events.error("decision_timeout");
            tracing::debug!(records = report.decision_timeout, "records judged alone: no decision for their trace");
        }
        if report.kept > 0 {
            ctx.waker.edge_written(Edge::KeptLogs);
        }
        if report.more_input {
            continue;
        }
        // New decisions wake this stage (tail_sample sends a wake-up); the sampler's watermark can
        // also move without one (it ingested spans, or has nothing left and "now" moves on), so
        // records that wait are looked at again at least once per second.
        let timeout = (report.waiting > 0).then_some(Duration::from_secs(1));
        ctx.idle_paced(timeout, stepped_at, LOG_STEP_INTERVAL).await;
    }
    ctx.events.log_summary();
    Ok(())
}

#[cfg(test)]
mod tests;
