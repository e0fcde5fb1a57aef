//! log_mirror: a log record is kept iff its trace was kept (1:1 on trace_id). A record without a
//! trace id is judged by the same rule the sampler applies to spans, on its own fields: kept at
//! ERROR severity or above. A record whose trace is not decided yet waits (up to `max_wait`
//! after it was received), then is judged on its own and counted as `decision_timeout`.
//!
//! Exactly-once: batches are resolved in order; the cursor moves past a batch only in the
//! transaction that writes its kept records, so a restart re-reads exactly the unresolved
//! batches. Decisions come from the decisions table tail_sample writes, which survives restarts
//! of either stage.

use std::time::Duration;

use tailgate_ipc::batch::{self, LogBatch, SEVERITY_NUMBER_ERROR, SubsetBuilder};
use tailgate_ipc::{Consumer, Edge, Queue};

use crate::context::{StageContext, StageError, unix_nanos_now, wait_if_full};

const MAX_BATCHES_PER_STEP: usize = 64;

/// Counts of one step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MirrorReport {
    /// Records read from resolved batches.
    pub received: u64,
    /// Records written to `kept_logs`.
    pub kept: u64,
    /// Records whose trace was dropped.
    pub dropped_trace: u64,
    /// Records without trace id below ERROR.
    pub dropped_untraced: u64,
    /// Records judged on their own because their trace's decision did not come in time.
    pub decision_timeout: u64,
    /// When the first still-waiting record times out, Unix nanoseconds.
    pub wait_until: Option<u64>,
    /// Whether the step stopped at its batch limit.
    pub more_input: bool,
}

enum Verdict {
    Keep,
    DropTrace,
    DropUntraced,
    Wait,
}

/// One step: resolves batches in order until one must wait; commits kept records and the
/// cursor together.
pub fn step(queue: &Queue, max_wait: Duration, now_unix_nano: u64) -> Result<MirrorReport, StageError> {
    let mut report = MirrorReport::default();
    let mut builder = SubsetBuilder::default();
    let mut kept = Vec::new();
    let mut kept_bytes = 0usize;
    let mut full: Vec<LogBatch> = Vec::new();
    let rtxn = queue.read()?;
    let cursor = queue.cursor(&rtxn, Consumer::LogMirror)?;
    let mut new_cursor = cursor;
    'batches: for (batches, entry) in queue.entries_after(&rtxn, Edge::Logs, cursor)?.enumerate() {
        if batches == MAX_BATCHES_PER_STEP {
            report.more_input = true;
            break;
        }
        let (seq, value) = entry?;
        let source = batch::access_logs(value)?;
        let received = source.received_unix_nano.to_native();
        let timed_out = now_unix_nano >= received.saturating_add(max_wait.as_nanos() as u64);
        let mut verdicts = Vec::with_capacity(source.logs.len());
        let mut batch_timeouts = 0;
        for log in source.logs.iter() {
            let judged_alone =
                if log.severity_number >= SEVERITY_NUMBER_ERROR { Verdict::Keep } else { Verdict::DropUntraced };
            let verdict = if log.trace_id == [0u8; 16] {
                judged_alone
            } else {
                match queue.decision(&rtxn, &log.trace_id)? {
                    Some(decision) if decision.keep => Verdict::Keep,
                    Some(_) => Verdict::DropTrace,
                    None if timed_out => {
                        batch_timeouts += 1;
                        judged_alone
                    }
                    None => Verdict::Wait,
                }
            };
            if matches!(verdict, Verdict::Wait) {
                report.wait_until = Some(received.saturating_add(max_wait.as_nanos() as u64));
                break 'batches;
            }
            verdicts.push(verdict);
        }
        for (log, verdict) in source.logs.iter().zip(verdicts) {
            match verdict {
                Verdict::Keep => {
                    let scope = builder.scope(seq, log.scope.to_native(), &source.resources, &source.scopes);
                    kept_bytes += log.body.len();
                    kept.push(batch::own_log(log, scope));
                    if kept_bytes >= crate::tail_sample::MAX_OUTPUT_BATCH_BYTES {
                        let (resources, scopes) = builder.take();
                        let logs = std::mem::take(&mut kept);
                        full.push(LogBatch { received_unix_nano: now_unix_nano, resources, scopes, logs });
                        kept_bytes = 0;
                    }
                }
                Verdict::DropTrace => report.dropped_trace += 1,
                Verdict::DropUntraced => report.dropped_untraced += 1,
                Verdict::Wait => {}
            }
        }
        report.received += source.logs.len() as u64;
        report.decision_timeout += batch_timeouts;
        new_cursor = seq;
    }
    drop(rtxn);
    if new_cursor == cursor {
        return Ok(report);
    }
    let mut wtxn = queue.write()?;
    queue.advance(&mut wtxn, Consumer::LogMirror, cursor, new_cursor)?;
    if !kept.is_empty() {
        let (resources, scopes) = builder.take();
        full.push(LogBatch { received_unix_nano: now_unix_nano, resources, scopes, logs: kept });
    }
    for out in &full {
        report.kept += out.logs.len() as u64;
        queue.append(&mut wtxn, Edge::KeptLogs, &batch::encode_logs(out)?)?;
    }
    queue.commit(wtxn)?;
    Ok(report)
}

/// Runs the stage: steps when woken (new logs, new decisions) or when a waiting record times out.
pub async fn run(mut ctx: StageContext) -> Result<(), StageError> {
    let max_wait = ctx.config.log_mirror.max_wait;
    let mut full_streak = 0;
    while !ctx.stopping() {
        let stepped_at = std::time::Instant::now();
        let report = match step(&ctx.queue, max_wait, unix_nanos_now()) {
            Ok(report) => report,
            Err(err) => {
                wait_if_full(&ctx, err, &mut full_streak).await?;
                continue;
            }
        };
        full_streak = 0;
        ctx.events.received(report.received);
        ctx.events.sent(report.kept);
        ctx.events.dropped("trace_dropped", report.dropped_trace);
        ctx.events.dropped("untraced_below_error", report.dropped_untraced);
        if report.decision_timeout > 0 {
            ctx.events.error("decision_timeout");
        }
        if report.kept > 0 {
            ctx.waker.edge_written(Edge::KeptLogs);
        }
        if report.more_input {
            continue;
        }
        let timeout = report
            .wait_until
            .map(|until| Duration::from_nanos(until.saturating_sub(unix_nanos_now())) + Duration::from_millis(1));
        ctx.idle_paced(timeout, stepped_at, crate::tail_sample::MIN_STEP_INTERVAL).await;
    }
    ctx.events.log_summary();
    Ok(())
}
