//! log_mirror: a log record is kept iff its trace was kept (1:1 on trace_id). A record without a
//! trace id is judged by the same rule the sampler applies to spans, on its own fields: kept at
//! ERROR severity or above. A record whose trace is not decided yet waits (up to `max_wait`
//! after it was received, or after this process started if that is later), then is judged on
//! its own and counted as `decision_timeout`. Each step records how far it got
//! (`LOG_MIRROR_PROGRESS_KEY`), and tail_sample keeps decisions that waiting records may need.
//!
//! Exactly-once: batches are resolved in order; the cursor moves past a batch only in the
//! transaction that writes its kept records, so a restart re-reads exactly the unresolved
//! batches. Decisions come from the decisions table tail_sample writes, which survives restarts
//! of either stage.

use std::time::Duration;

use tailgate_ipc::batch::{self, LogBatch, SEVERITY_NUMBER_ERROR, SubsetBuilder};
use tailgate_ipc::decisions::LOG_MIRROR_PROGRESS_KEY;
use tailgate_ipc::{Consumer, Edge, Queue};

use crate::context::{StageContext, StageError, unix_nanos_now, wait_if_full};

use crate::limits::MAX_BATCHES_PER_STEP;

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
///
/// A record's wait runs from when it was received or from `wait_from` (when this process
/// started), whichever is later: after downtime, records get their full wait again while
/// tail_sample catches up, instead of all timing out at once.
pub fn step(queue: &Queue, max_wait: Duration, wait_from: u64, now_unix_nano: u64) -> Result<MirrorReport, StageError> {
    let mut report = MirrorReport::default();
    let mut builder = SubsetBuilder::default();
    let mut kept = Vec::new();
    let mut kept_bytes = 0usize;
    let mut full: Vec<LogBatch> = Vec::new();
    let rtxn = queue.read()?;
    let cursor = queue.cursor(&rtxn, Consumer::LogMirror)?;
    let mut new_cursor = cursor;
    let mut progress = 0;
    'batches: for (batches, entry) in queue.entries_after(&rtxn, Edge::Logs, cursor)?.enumerate() {
        if batches == MAX_BATCHES_PER_STEP {
            report.more_input = true;
            break;
        }
        let (seq, value) = entry?;
        let source = batch::access_logs(value)?;
        let received = source.received_unix_nano.to_native();
        let waiting_since = received.max(wait_from).min(now_unix_nano);
        let timed_out = now_unix_nano >= waiting_since.saturating_add(max_wait.as_nanos() as u64);
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
                report.wait_until = Some(waiting_since.saturating_add(max_wait.as_nanos() as u64));
                break 'batches;
            }
            verdicts.push(verdict);
        }
        for (log, verdict) in source.logs.iter().zip(verdicts) {
            match verdict {
                Verdict::Keep => {
                    // Seal before a record would take the batch past the limit.
                    if !kept.is_empty() && kept_bytes + log.body.len() > crate::limits::MAX_OUTPUT_BATCH_BYTES {
                        let (resources, scopes) = builder.take();
                        let logs = std::mem::take(&mut kept);
                        full.push(LogBatch { received_unix_nano: now_unix_nano, resources, scopes, logs });
                        kept_bytes = 0;
                    }
                    let scope = builder.scope(seq, log.scope.to_native(), &source.resources, &source.scopes);
                    kept_bytes += log.body.len();
                    kept.push(batch::own_log(log, scope));
                }
                Verdict::DropTrace => report.dropped_trace += 1,
                Verdict::DropUntraced => report.dropped_untraced += 1,
                Verdict::Wait => {}
            }
        }
        report.received += source.logs.len() as u64;
        report.decision_timeout += batch_timeouts;
        new_cursor = seq;
        progress = received;
    }
    drop(rtxn);
    if new_cursor == cursor {
        return Ok(report);
    }
    let mut wtxn = queue.write()?;
    queue.advance(&mut wtxn, Consumer::LogMirror, cursor, new_cursor)?;
    queue.set_meta_u64(&mut wtxn, LOG_MIRROR_PROGRESS_KEY, progress)?;
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
    let started = unix_nanos_now();
    let mut full_streak = 0;
    while !ctx.stopping() {
        let stepped_at = std::time::Instant::now();
        let report = match step(&ctx.queue, max_wait, started, unix_nanos_now()) {
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
        ctx.idle_paced(timeout, stepped_at, crate::limits::MIN_STEP_INTERVAL).await;
    }
    ctx.events.log_summary();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_ipc::QueueOptions;
    use tailgate_ipc::batch::{LogEntry, ResourceBlock, ScopeBlock};
    use tailgate_ipc::decisions::Decision;

    const T0: u64 = 1_000_000_000_000;
    const WAIT: Duration = Duration::from_secs(30);

    fn log(trace: u8, severity: u8, tag: u8) -> LogEntry {
        LogEntry { trace_id: [trace; 16], severity_number: severity, body: vec![tag], ..Default::default() }
    }

    fn append(queue: &Queue, logs: Vec<LogEntry>) {
        let batch = LogBatch {
            received_unix_nano: T0,
            resources: vec![ResourceBlock::default()],
            scopes: vec![ScopeBlock::default()],
            logs,
        };
        let mut wtxn = queue.write().unwrap();
        queue.append(&mut wtxn, Edge::Logs, &batch::encode_logs(&batch).unwrap()).unwrap();
        queue.commit(wtxn).unwrap();
    }

    fn decide(queue: &Queue, trace: u8, keep: bool) {
        let mut wtxn = queue.write().unwrap();
        queue.put_decision(&mut wtxn, &[trace; 16], &Decision { keep, decided_unix_ms: 1, last_seq: 0 }).unwrap();
        queue.commit(wtxn).unwrap();
    }

    fn kept_tags(queue: &Queue) -> Vec<u8> {
        let rtxn = queue.read().unwrap();
        let mut tags = Vec::new();
        for entry in queue.entries_after(&rtxn, Edge::KeptLogs, 0).unwrap() {
            let (_, value) = entry.unwrap();
            tags.extend(batch::access_logs(value).unwrap().logs.iter().map(|l| l.body[0]));
        }
        tags
    }

    #[test]
    fn logs_follow_decisions_and_wait_for_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
        decide(&queue, 1, true);
        decide(&queue, 2, false);
        // Tags: 10 kept trace, 20 dropped trace, 30 undecided trace, 40/41 untraced ERROR/INFO.
        append(&queue, vec![log(1, 9, 10), log(2, 17, 20), log(3, 9, 30), log(0, 17, 40), log(0, 9, 41)]);
        let waiting = step(&queue, WAIT, 0, T0 + 1).unwrap();
        assert_eq!(waiting.wait_until, Some(T0 + WAIT.as_nanos() as u64));
        assert!(kept_tags(&queue).is_empty());
        decide(&queue, 3, true);
        let done = step(&queue, WAIT, 0, T0 + 2).unwrap();
        assert_eq!((done.kept, done.dropped_trace, done.dropped_untraced), (3, 1, 1));
        assert_eq!(kept_tags(&queue), vec![10, 30, 40]);
        let rtxn = queue.read().unwrap();
        assert_eq!(queue.meta_u64(&rtxn, LOG_MIRROR_PROGRESS_KEY).unwrap(), Some(T0));
        assert_eq!(queue.depth(&rtxn, Edge::Logs).unwrap().batches, 0);
    }

    #[test]
    fn an_undecided_trace_times_out_into_its_own_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
        append(&queue, vec![log(5, 9, 50), log(6, 21, 60)]);
        let late = T0 + WAIT.as_nanos() as u64;
        // A process started after the records arrived gives them their full wait again.
        let restarted_at = T0 + 20_000_000_000;
        assert_eq!(step(&queue, WAIT, restarted_at, late).unwrap().received, 0);
        let done = step(&queue, WAIT, restarted_at, restarted_at + WAIT.as_nanos() as u64).unwrap();
        assert_eq!(done.decision_timeout, 2);
        assert_eq!(kept_tags(&queue), vec![60]);
    }
}
