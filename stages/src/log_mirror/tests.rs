use std::time::Duration;

use tailgate_ipc::QueueOptions;
use tailgate_ipc::batch::{LogEntry, ResourceBlock, ScopeBlock, SpanBatch, SpanRecord};
use tailgate_ipc::decisions::{Decision, SAMPLER_READ_POS_KEY, SamplerWatermark};

use super::*;

const T0: u64 = 1_000_000_000_000;
const WAIT: Duration = Duration::from_secs(30);
const WAIT_NS: u64 = 30_000_000_000;

fn rule() -> Rule {
    Rule { max_wait: WAIT, keep_errors: true, latency_threshold: Duration::from_millis(200) }
}

fn open_queue() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    (dir, queue)
}

fn log(trace: u8, severity: u8, tag: u8) -> LogEntry {
    LogEntry { trace_id: [trace; 16], severity_number: severity, body: vec![tag], ..Default::default() }
}

fn append_at(queue: &Queue, received: u64, logs: Vec<LogEntry>) {
    let batch = LogBatch {
        received_unix_nano: received,
        resources: vec![ResourceBlock::default()],
        scopes: vec![ScopeBlock::default()],
        logs,
    };
    let mut wtxn = queue.write().unwrap();
    queue.append(&mut wtxn, Edge::Logs, &batch::encode_logs(&batch).unwrap()).unwrap();
    queue.commit(wtxn).unwrap();
}

fn append(queue: &Queue, logs: Vec<LogEntry>) {
    append_at(queue, T0, logs);
}

fn decide(queue: &Queue, trace: u8, keep: bool, decided_ms: u64) {
    let mut wtxn = queue.write().unwrap();
    queue
        .put_decision(
            &mut wtxn,
            &[trace; 16],
            &Decision { keep, decided_unix_ms: decided_ms, last_seq: 0, policy: None },
        )
        .unwrap();
    queue.commit(wtxn).unwrap();
}

/// The sampler has a spans batch it has not read and last read spans received at `through`.
fn sampler_stuck_at(queue: &Queue, through: u64) {
    let spans = SpanBatch { received_unix_nano: through, spans: vec![SpanRecord::default()], ..Default::default() };
    let mut wtxn = queue.write().unwrap();
    let seq = queue.append(&mut wtxn, Edge::Spans, &batch::encode_spans(&spans).unwrap()).unwrap();
    queue.set_meta_u64(&mut wtxn, SAMPLER_READ_POS_KEY, seq - 1).unwrap();
    let mark = SamplerWatermark { oldest_pending: u64::MAX, ingested_until: through };
    queue.set_sampler_watermark(&mut wtxn, &mark).unwrap();
    queue.commit(wtxn).unwrap();
}

fn kept_tags(queue: &Queue) -> Vec<u8> {
    let rtxn = queue.read().unwrap();
    let mut tags = Vec::new();
    for entry in queue.entries_after(&rtxn, Edge::KeptLogs, 0).unwrap() {
        let (_, value) = entry.unwrap();
        tags.extend(batch::access_logs(value).unwrap().logs.iter().map(|l| l.body[0]));
    }
    tags.sort();
    tags
}

#[test]
fn logs_follow_decisions_and_a_waiting_record_holds_up_nobody() {
    let (_dir, queue) = open_queue();
    sampler_stuck_at(&queue, T0);
    decide(&queue, 1, true, 1);
    decide(&queue, 2, false, 1);
    // Tags: 10 kept trace, 20 dropped trace, 30 undecided, 40/41 untraced ERROR/INFO.
    append(&queue, vec![log(3, 9, 30), log(1, 9, 10)]);
    append(&queue, vec![log(2, 17, 20), log(0, 17, 40), log(0, 9, 41), log(1, 9, 11)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    let first = mirror.step(&queue, T0 + 1).unwrap();
    assert_eq!((first.kept, first.dropped_trace, first.dropped_untraced, first.waiting), (3, 1, 1, 1));
    assert_eq!(kept_tags(&queue), vec![10, 11, 40]);
    {
        let rtxn = queue.read().unwrap();
        // The first batch still waits: the cursor has not passed it.
        assert_eq!(queue.cursor(&rtxn, Consumer::LogMirror).unwrap(), 0);
    }
    decide(&queue, 3, true, 2);
    let second = mirror.step(&queue, T0 + 2).unwrap();
    assert_eq!((second.kept, second.waiting), (1, 0));
    assert_eq!(kept_tags(&queue), vec![10, 11, 30, 40]);
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.cursor(&rtxn, Consumer::LogMirror).unwrap(), 2);
    assert_eq!(queue.depth(&rtxn, Edge::Logs).unwrap().batches, 0);
    assert!(queue.state_prefix(&rtxn, BITMAP_PREFIX).unwrap().is_empty(), "bitmaps of passed batches are deleted");
}

#[test]
fn later_records_of_a_waiting_trace_follow_its_decision_whenever_it_came() {
    // A record of a trace that already waits is indexed without a lookup: its decision is
    // found by the scan of new decisions, also when it was made before the record arrived or in
    // the same millisecond as the previous scan.
    let (_dir, queue) = open_queue();
    sampler_stuck_at(&queue, T0);
    append(&queue, vec![log(7, 9, 70), log(8, 9, 80)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    assert_eq!(mirror.step(&queue, T0 + 1).unwrap().waiting, 2);
    // Trace 7 is decided, then another of its records arrives.
    decide(&queue, 7, true, 5);
    decide(&queue, 9, false, 6);
    append(&queue, vec![log(7, 9, 71)]);
    let second = mirror.step(&queue, T0 + 2).unwrap();
    assert_eq!((second.kept, second.waiting), (2, 1));
    // Trace 8 is decided in the millisecond the last scan ended at, after it.
    decide(&queue, 8, true, 6);
    append(&queue, vec![log(8, 9, 81), log(8, 9, 82)]);
    let third = mirror.step(&queue, T0 + 3).unwrap();
    assert_eq!((third.kept, third.waiting), (3, 0));
    assert_eq!(kept_tags(&queue), vec![70, 71, 80, 81, 82]);
}

#[test]
fn waiting_follows_the_sampler_not_the_clock() {
    let (_dir, queue) = open_queue();
    // The sampler is behind: it has decided only what was received up to T0.
    sampler_stuck_at(&queue, T0);
    append(&queue, vec![log(5, 9, 50), log(6, 21, 60)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    // Hours pass on the wall clock; the sampler does not move: the records keep waiting.
    let report = mirror.step(&queue, T0 + 10 * WAIT_NS).unwrap();
    assert_eq!((report.waiting, report.decision_timeout), (2, 0));
    // The sampler catches up, decides trace 5 and passes T0 + max_wait without trace 6.
    decide(&queue, 5, true, 3);
    sampler_stuck_at(&queue, T0 + WAIT_NS);
    let report = mirror.step(&queue, T0 + 10 * WAIT_NS).unwrap();
    assert_eq!((report.decision_timeout, report.waiting), (1, 0));
    // 50 follows its kept trace; 60 is judged on its own (FATAL: kept).
    assert_eq!(kept_tags(&queue), vec![50, 60]);
}

#[test]
fn with_nothing_to_sample_the_wait_is_wall_clock() {
    let (_dir, queue) = open_queue();
    append(&queue, vec![log(7, 9, 70), log(8, 17, 80)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    assert_eq!(mirror.step(&queue, T0 + 1).unwrap().waiting, 2);
    let report = mirror.step(&queue, T0 + WAIT_NS).unwrap();
    assert_eq!(report.decision_timeout, 2);
    assert_eq!(kept_tags(&queue), vec![80]);
}

#[test]
fn a_restart_neither_loses_nor_repeats_a_record() {
    let (_dir, queue) = open_queue();
    sampler_stuck_at(&queue, T0);
    decide(&queue, 1, true, 1);
    append(&queue, vec![log(1, 9, 10), log(2, 9, 20), log(3, 9, 30)]);
    append(&queue, vec![log(1, 9, 11), log(3, 9, 31)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    mirror.step(&queue, T0 + 1).unwrap();
    assert_eq!(kept_tags(&queue), vec![10, 11]);
    drop(mirror);
    // Trace 3 is decided while log_mirror is down; trace 2 after it restarted.
    decide(&queue, 3, true, 2);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    assert_eq!(mirror.waiting_records(), 3);
    mirror.step(&queue, T0 + 2).unwrap();
    assert_eq!(kept_tags(&queue), vec![10, 11, 30, 31]);
    drop(mirror);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    assert_eq!(mirror.waiting_records(), 1);
    decide(&queue, 2, false, 3);
    mirror.step(&queue, T0 + 3).unwrap();
    assert_eq!(kept_tags(&queue), vec![10, 11, 30, 31]);
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.depth(&rtxn, Edge::Logs).unwrap().batches, 0);
}

#[test]
fn untraced_records_follow_the_samplers_rule_on_their_own_fields() {
    let (_dir, queue) = open_queue();
    let slow = LogEntry { duration_nanos: 350_000_000, body: vec![1], ..Default::default() };
    let fast = LogEntry { duration_nanos: 50_000_000, body: vec![2], ..Default::default() };
    let error = LogEntry { severity_number: 17, body: vec![3], ..Default::default() };
    let info = LogEntry { severity_number: 9, body: vec![4], ..Default::default() };
    append(&queue, vec![slow, fast, error, info]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    let report = mirror.step(&queue, T0).unwrap();
    assert_eq!((report.kept, report.dropped_untraced), (2, 2));
    assert_eq!(kept_tags(&queue), vec![1, 3]);
}

#[test]
fn untraced_records_of_a_route_use_its_adaptive_threshold() {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    use prost::Message;
    let (_dir, queue) = open_queue();
    // An adaptive latency policy lifted /checkout to 250 ms.
    let mut wtxn = queue.write().unwrap();
    let lifted = RouteThresholds { routes: [("/checkout".to_string(), 250)].into(), changes: 2 };
    queue.set_route_thresholds(&mut wtxn, &lifted).unwrap();
    queue.commit(wtxn).unwrap();
    let record = |route: &str, ms: u64| {
        let attribute = KeyValue {
            key: "http.route".into(),
            value: Some(AnyValue { value: Some(Value::StringValue(route.into())) }),
            ..Default::default()
        };
        let body = LogRecord { attributes: vec![attribute], ..Default::default() }.encode_to_vec();
        LogEntry { duration_nanos: ms * 1_000_000, body, ..Default::default() }
    };
    append(&queue, vec![record("/checkout", 230), record("/other", 230), record("/checkout", 260)]);
    let mut mirror = Mirror::open(&queue, rule()).unwrap();
    let report = mirror.step(&queue, T0).unwrap();
    assert_eq!((report.kept, report.dropped_untraced), (2, 1));
    let rtxn = queue.read().unwrap();
    let (_, value) = queue.entries_after(&rtxn, Edge::KeptLogs, 0).unwrap().next().unwrap().unwrap();
    let durations: Vec<u64> =
        batch::access_logs(value).unwrap().logs.iter().map(|l| l.duration_nanos.to_native() / 1_000_000).collect();
    assert_eq!(durations, vec![230, 260], "the /other record at the base threshold, /checkout's over 250 ms");
}
