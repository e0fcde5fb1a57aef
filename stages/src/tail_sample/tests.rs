use super::*;
use tailgate_ipc::QueueOptions;
use tailgate_ipc::batch::SpanBatch;
use tailgate_ipc::batch::{ResourceBlock, ScopeBlock, SpanRecord};

const T0: u64 = 1_000_000_000_000;

fn policy() -> Policy {
    Policy {
        decision_wait: Duration::from_secs(10),
        root_grace: Duration::from_secs(1),
        keep_errors: true,
        latency_threshold: Duration::from_millis(200),
        policies: Vec::new(),
        decision_cache_ttl: Duration::from_secs(120),
        kept_decision_ttl: Duration::from_secs(1800),
        spanmetrics: super::summaries::SeriesSettings::default(),
        max_spans_per_trace: 10_000,
        max_pending_bytes: 64 << 20,
    }
}

fn span(trace: u8, id: u8, root: bool, error: bool) -> SpanRecord {
    SpanRecord {
        trace_id: [trace; 16],
        span_id: [id; 8],
        parent_span_id: if root { [0; 8] } else { [0xee; 8] },
        start_unix_nano: T0,
        end_unix_nano: T0 + 1_000_000,
        status_code: if error { batch::STATUS_CODE_ERROR } else { 0 },
        body: vec![trace, id],
        ..Default::default()
    }
}

fn append(queue: &Queue, spans: Vec<SpanRecord>) {
    let batch = SpanBatch {
        received_unix_nano: T0,
        resources: vec![ResourceBlock::default()],
        scopes: vec![ScopeBlock::default()],
        spans,
    };
    let mut wtxn = queue.write().unwrap();
    queue.append(&mut wtxn, Edge::Spans, &batch::encode_spans(&batch).unwrap()).unwrap();
    queue.commit(wtxn).unwrap();
}

fn kept(queue: &Queue) -> Vec<([u8; 16], [u8; 8])> {
    let rtxn = queue.read().unwrap();
    let mut out = Vec::new();
    for entry in queue.entries_after(&rtxn, Edge::KeptSpans, 0).unwrap() {
        let (_, value) = entry.unwrap();
        for span in batch::access_spans(value).unwrap().spans.iter() {
            out.push((span.trace_id, span.span_id));
        }
    }
    out
}

/// Heap of the pending index per trace (a measurement for BENCHMARKS.md, not a check):
/// `cargo test --release -p tailgate-stages pending_index_heap -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run it by name"]
fn pending_index_heap_per_trace() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 1 << 30, ..Default::default() }).unwrap();
    let traces = 200_000u32;
    for chunk in 0..traces / 1000 {
        let spans = (0..1000u32)
            .flat_map(|n| {
                let id = (chunk * 1000 + n).to_be_bytes();
                let mut trace = [0u8; 16];
                trace[..4].copy_from_slice(&id);
                (1..=3u8).map(move |s| SpanRecord {
                    trace_id: trace,
                    span_id: [s; 8],
                    parent_span_id: [0xee; 8],
                    start_unix_nano: T0,
                    end_unix_nano: T0 + 1_000_000,
                    ..Default::default()
                })
            })
            .collect();
        append(&queue, spans);
    }
    let before = tailgate_ipc::memory::private_bytes().unwrap();
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    while sampler.step(&queue, T0 + 1).unwrap().more_input {}
    let after = tailgate_ipc::memory::private_bytes().unwrap();
    assert_eq!(sampler.pending_traces(), traces as usize);
    eprintln!(
        "{traces} pending traces of 3 spans: {:.0} bytes of heap per trace (estimate used for max_pending_bytes: {})",
        after.saturating_sub(before) as f64 / f64::from(traces),
        PENDING_TRACE_BYTES + 3 * PENDING_SPAN_BYTES
    );
}

#[test]
fn a_giant_trace_is_decided_at_its_span_limit() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    let mut sampler = Sampler::open(&queue, Policy { max_spans_per_trace: 3, ..policy() }).unwrap();
    append(&queue, (1..=5).map(|id| span(7, id, false, false)).chain([span(8, 1, false, false)]).collect());
    let report = sampler.step(&queue, T0 + 1).unwrap();
    assert_eq!(report.decided_early, 1);
    // Long before decision_wait: the giant trace is decided, the small one waits.
    assert_eq!(report.decided, 1);
    assert_eq!(sampler.pending_traces(), 1);
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.decision(&rtxn, &[7; 16]).unwrap().map(|d| d.keep), Some(false));
    assert_eq!(queue.decision(&rtxn, &[8; 16]).unwrap(), None);
}

#[test]
fn over_its_budget_the_index_decides_the_traces_due_soonest() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    // Room for four single-span traces.
    let budget = 4 * (PENDING_TRACE_BYTES + PENDING_SPAN_BYTES);
    let mut sampler = Sampler::open(&queue, Policy { max_pending_bytes: budget, ..policy() }).unwrap();
    append(&queue, (1..=10).map(|trace| span(trace, 1, false, trace == 2)).collect());
    let report = sampler.step(&queue, T0 + 1).unwrap();
    assert_eq!(report.decided_early, 6);
    assert_eq!(sampler.pending_traces(), 4);
    assert!(sampler.pending_bytes() <= budget);
    // Trace 2's error was seen: deciding it early kept it.
    assert_eq!(kept(&queue), vec![([2; 16], [1; 8])]);
}

#[test]
fn shedding_decides_the_traces_known_to_be_kept_and_lets_the_others_wait() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    // Trace 1 has an error span (kept whatever comes), trace 2 only an ordinary one so far.
    append(&queue, vec![span(1, 1, false, true), span(2, 1, false, false)]);
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    sampler.step(&queue, T0 + 1).unwrap();
    assert!(kept(&queue).is_empty(), "nothing is due before decision_wait");
    assert_eq!(sampler.shed(), 1);
    sampler.step(&queue, T0 + 2).unwrap();
    assert_eq!(kept(&queue), vec![([1; 16], [1; 8])]);
    assert_eq!(sampler.pending_traces(), 1, "the undecided trace must keep waiting for a late error");
    // Its late error span still makes it kept when it is due.
    append(&queue, vec![span(2, 2, false, true)]);
    sampler.step(&queue, T0 + 11_000_000_000).unwrap();
    assert_eq!(kept(&queue).len(), 3);
}

/// Trace 1 has an ordinary span in the first batch and its error span in the last of 100
/// batches; the 98 batches between hold fast single-span traces. All are ingested, then the
/// sampler "crashes" (is dropped) before anything is due.
fn queue_with_long_replay() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    append(&queue, vec![span(1, 1, false, false)]);
    for n in 2..100u8 {
        append(&queue, vec![span(n, 1, true, false)]);
    }
    append(&queue, vec![span(1, 2, false, true)]);
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    while sampler.step(&queue, T0).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), 99);
    (dir, queue)
}

fn run_until_idle(queue: &Queue, now: u64) -> Sampler {
    let mut sampler = Sampler::open(queue, policy()).unwrap();
    while sampler.step(queue, now).unwrap().more_input {}
    sampler.step(queue, now).unwrap();
    sampler
}

#[test]
fn replay_longer_than_one_step_keeps_the_whole_trace() {
    let (_dir, queue) = queue_with_long_replay();
    let sampler = run_until_idle(&queue, T0 + 60_000_000_000);
    assert_eq!(sampler.pending_traces(), 0);
    assert_eq!(kept(&queue), vec![([1; 16], [1; 8]), ([1; 16], [2; 8])]);
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.cursor(&rtxn, Consumer::TailSample).unwrap(), 100);
    assert_eq!(queue.depth(&rtxn, Edge::Spans).unwrap().batches, 0);
}

#[test]
fn crash_during_replay_emits_nothing_twice() {
    let (_dir, queue) = queue_with_long_replay();
    let now = T0 + 60_000_000_000;
    // First restart gets one step into the replay, then dies too.
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    assert!(sampler.step(&queue, now).unwrap().more_input);
    drop(sampler);
    run_until_idle(&queue, now);
    assert_eq!(kept(&queue), vec![([1; 16], [1; 8]), ([1; 16], [2; 8])]);
}

#[test]
fn backlog_built_up_during_a_restart_is_read_before_deciding() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    append(&queue, vec![span(1, 1, true, false)]);
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    sampler.step(&queue, T0).unwrap();
    drop(sampler);
    // While tail_sample is down, 98 more batches arrive, the trace's error span last.
    for n in 2..100u8 {
        append(&queue, vec![span(n, 1, true, false)]);
    }
    append(&queue, vec![span(1, 2, false, true)]);
    run_until_idle(&queue, T0 + 60_000_000_000);
    assert_eq!(kept(&queue), vec![([1; 16], [1; 8]), ([1; 16], [2; 8])]);
}

#[test]
fn late_span_follows_the_decision_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    append(&queue, vec![span(7, 1, true, true)]);
    run_until_idle(&queue, T0 + 5_000_000_000);
    append(&queue, vec![span(7, 2, false, false)]);
    // Restart between the late span's arrival and its handling, then once more after.
    run_until_idle(&queue, T0 + 6_000_000_000);
    run_until_idle(&queue, T0 + 7_000_000_000);
    assert_eq!(kept(&queue), vec![([7; 16], [1; 8]), ([7; 16], [2; 8])]);
}

#[test]
fn a_backlog_is_judged_in_receive_time() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    // The root arrives at T0; its error child 9 s later, after the root's grace (1 s) ran
    // out. The sampler was down all along and reads both in one step: the trace must be
    // judged as it would have been at T0 + 1 s (dropped), the error span as a late span.
    let batch = |received: u64, spans| SpanBatch {
        received_unix_nano: received,
        resources: vec![ResourceBlock::default()],
        scopes: vec![ScopeBlock::default()],
        spans,
    };
    for (received, spans) in [(T0, vec![span(3, 1, true, false)]), (T0 + 9_000_000_000, vec![span(3, 2, false, true)])]
    {
        let mut wtxn = queue.write().unwrap();
        queue.append(&mut wtxn, Edge::Spans, &batch::encode_spans(&batch(received, spans)).unwrap()).unwrap();
        queue.commit(wtxn).unwrap();
    }
    run_until_idle(&queue, T0 + 60_000_000_000);
    assert!(kept(&queue).is_empty());
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.decision(&rtxn, &[3; 16]).unwrap().map(|d| d.keep), Some(false));
}

#[test]
fn a_kept_trace_stays_kept_after_the_decision_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    let secs = |s: u64| T0 + s * 1_000_000_000;
    append(&queue, vec![span(8, 1, true, true), span(9, 1, true, false)]);
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    assert_eq!(sampler.step(&queue, secs(5)).unwrap().decided, 2);
    // Past the TTL (120 s): the drop decision is forgotten, the keep decision is not.
    sampler.step(&queue, secs(130)).unwrap();
    append(&queue, vec![span(7, 1, true, false)]); // anything, so the next step writes
    sampler.step(&queue, secs(131)).unwrap();
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.decision(&rtxn, &[9; 16]).unwrap(), None);
    assert!(queue.decision(&rtxn, &[8; 16]).unwrap().is_some_and(|d| d.keep));
    drop(rtxn);
    // A fast late span of the kept trace follows the keep (it is not judged as a new trace,
    // whose drop would overwrite the keep for the logs that follow) and is counted as late.
    append(&queue, vec![span(8, 2, false, false)]);
    let report = sampler.step(&queue, secs(140)).unwrap();
    assert_eq!((report.late, report.kept), (1, 1));
    assert_eq!(kept(&queue), vec![([8; 16], [1; 8]), ([8; 16], [2; 8])]);
    let rtxn = queue.read().unwrap();
    assert!(queue.decision(&rtxn, &[8; 16]).unwrap().is_some_and(|d| d.keep));
    drop(rtxn);
    // Past `kept_decision_ttl` (30 min) the keep decision goes too: storage stays bounded.
    append(&queue, vec![span(6, 1, true, false)]);
    sampler.step(&queue, secs(140 + 1801)).unwrap();
    let rtxn = queue.read().unwrap();
    assert_eq!(queue.decision(&rtxn, &[8; 16]).unwrap(), None);
}

/// The sampling policies (and a drop policy), as the bench's `POLICIES=1` runs them.
const BENCH_POLICIES: &str = "
- {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
- {name: slow, type: latency, latency: {threshold_ms: 200}}
- {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}
- {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
- {name: no-health, type: drop, drop: {drop_sub_policy: [{name: health, type: string_attribute, string_attribute: {key: http.route, values: [/healthz]}}]}}
";

/// Sampler CPU per span in process, on requests shaped like the load generator's (5-span
/// traces, 512 spans a batch, one batch a millisecond): a measurement, and the harness to
/// profile the sampler with callgrind.
/// `TAILGATE_BENCH_SPANS=1000000 [TAILGATE_BENCH_POLICIES=1] cargo test --release -p
/// tailgate-stages sampler_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run it by name"]
fn sampler_throughput() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;
    let spans_wanted: u64 =
        std::env::var("TAILGATE_BENCH_SPANS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let with_policies = std::env::var("TAILGATE_BENCH_POLICIES").is_ok();
    // The allocator as the stage process sets it.
    tailgate_ipc::memory::tune_allocator();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 4 << 30, ..Default::default() }).unwrap();
    let kv = |key: &str, value: &str| KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(Value::StringValue(value.into())) }),
        ..Default::default()
    };
    let batches = spans_wanted.div_ceil(510);
    let filling = std::time::Instant::now();
    let mut trace = 0u64;
    for b in 0..batches {
        let received = T0 + b * 1_000_000;
        let mut spans = Vec::new();
        for _ in 0..102 {
            trace += 1;
            let mut trace_id = [0u8; 16];
            trace_id[..8].copy_from_slice(&trace.to_be_bytes());
            trace_id[8..].copy_from_slice(&trace.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            let error = trace.is_multiple_of(20);
            let slow = trace.is_multiple_of(7);
            for s in 0..5u32 {
                let mut span_id = [0u8; 8];
                span_id[..4].copy_from_slice(&(trace as u32).to_be_bytes());
                span_id[4..].copy_from_slice(&(s + 1).to_be_bytes());
                let root_len = if slow { 250_000_000 } else { 40_000_000 };
                spans.push(Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    parent_span_id: if s == 0 { Vec::new() } else { [&span_id[..4], &1u32.to_be_bytes()[..]].concat() },
                    name: if s == 0 { "GET /api/orders".into() } else { format!("SELECT orders {s}") },
                    start_time_unix_nano: T0 + if s == 0 { 0 } else { 1_000_000 },
                    end_time_unix_nano: T0 + if s == 0 { root_len } else { 6_000_000 },
                    attributes: vec![kv("http.route", "/api/orders"), kv("db.system", "postgresql")],
                    status: Some(Status { code: if error && s == 4 { 2 } else { 0 }, message: String::new() }),
                    ..Default::default()
                });
            }
        }
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "orders"), kv("host.name", "edge-1")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        };
        let batch =
            crate::otlp_wire::transcode_traces(&request.encode_to_vec(), received, &crate::otlp_wire::Limits::NONE)
                .unwrap()
                .batch;
        let mut wtxn = queue.write().unwrap();
        queue.append(&mut wtxn, Edge::Spans, &batch::encode_spans(&batch).unwrap()).unwrap();
        queue.commit(wtxn).unwrap();
    }
    eprintln!("queue filled in {:?}; sampling starts", filling.elapsed());
    let mut policy = policy();
    if with_policies {
        policy.policies = serde_saphyr::from_str(BENCH_POLICIES).unwrap();
        policy.keep_errors = true;
        policy.latency_threshold = Duration::from_millis(200);
    }
    let cpu = || {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        text.split_whitespace().next().unwrap().parse::<u64>().unwrap()
    };
    let faults = || {
        let text = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = text.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[7].parse::<u64>().unwrap()
    };
    let written = || {
        let text = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        let line = text.lines().find(|line| line.starts_with("wchar:")).unwrap();
        line["wchar:".len()..].trim().parse::<u64>().unwrap()
    };
    let faults_before = faults();
    let written_before = written();
    let before = cpu();
    let mut sampler = Sampler::open(&queue, policy).unwrap();
    let (mut ingested, mut kept) = (0, 0);
    // Far past every receive time: each batch is read, then what was due before it decided.
    let now = T0 + batches * 1_000_000 + 3_600_000_000_000;
    loop {
        let report = sampler.step(&queue, now).unwrap();
        ingested += report.ingested;
        kept += report.kept;
        if !report.more_input && sampler.pending_traces() == 0 {
            break;
        }
    }
    let seconds = (cpu() - before) as f64 / 1e9;
    eprintln!(
        "{ingested} spans ({kept} kept), policies: {with_policies}: {seconds:.2} CPU-s, {:.2} M spans per CPU-second, {} minor faults, {:.0} bytes written per span",
        ingested as f64 / seconds / 1e6,
        faults() - faults_before,
        (written() - written_before) as f64 / ingested as f64
    );
}

#[test]
fn the_index_gives_back_a_bursts_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 256 << 20, ..Default::default() }).unwrap();
    // A burst of 100,000 pending traces, all decided.
    for chunk in 0..100u32 {
        let spans = (0..1000u32)
            .map(|n| {
                let mut trace_id = [0u8; 16];
                trace_id[..4].copy_from_slice(&(chunk * 1000 + n).to_be_bytes());
                SpanRecord { trace_id, span_id: [1; 8], parent_span_id: [0xee; 8], ..Default::default() }
            })
            .collect();
        append(&queue, spans);
    }
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    while sampler.step(&queue, T0).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), 100_000);
    let burst_capacity = sampler.traces.capacity();
    while sampler.step(&queue, T0 + 60_000_000_000).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), 0);
    assert!(sampler.compact());
    assert!(sampler.traces.capacity() <= COMPACT_ABOVE_CAPACITY, "{} of {burst_capacity}", sampler.traces.capacity());
    // A steady index is left alone.
    assert!(!sampler.compact());
}

/// Every decision lands on its own page of the decisions table, and LMDB keeps the pages of the
/// largest transaction buffered in the process for good: a step decides a bounded number of
/// traces, and a backlog of due traces is decided over several steps, none lost.
#[test]
fn a_step_decides_a_bounded_number_of_traces() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    let traces = 2 * MAX_DECISIONS_PER_STEP + 100;
    let spans = (0..traces as u32)
        .map(|n| {
            let mut trace_id = [0u8; 16];
            trace_id[..4].copy_from_slice(&n.to_be_bytes());
            SpanRecord { trace_id, span_id: [1; 8], parent_span_id: [0xee; 8], ..Default::default() }
        })
        .collect();
    append(&queue, spans);
    let mut sampler = Sampler::open(&queue, policy()).unwrap();
    while sampler.step(&queue, T0).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), traces);
    let mut steps = Vec::new();
    loop {
        let report = sampler.step(&queue, T0 + 60_000_000_000).unwrap();
        steps.push(report.decided);
        if !report.more_input {
            break;
        }
    }
    assert_eq!(sampler.pending_traces(), 0);
    assert_eq!(steps.iter().sum::<u64>(), traces as u64);
    assert_eq!(steps, [MAX_DECISIONS_PER_STEP as u64, MAX_DECISIONS_PER_STEP as u64, 100]);
}

/// A span whose client left the start time unset (0) has no known duration: it does not make
/// its trace slow (today's clock minus nothing would be decades).
#[test]
fn a_span_without_a_start_time_is_not_slow() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    let unset = |trace, error| SpanRecord { start_unix_nano: 0, ..span(trace, 1, true, error) };
    let backwards = SpanRecord { start_unix_nano: T0 + 5_000_000_000, ..span(3, 1, true, false) };
    append(&queue, vec![unset(1, false), unset(2, true), backwards]);
    run_until_idle(&queue, T0 + 60_000_000_000);
    assert_eq!(kept(&queue), vec![([2; 16], [1; 8])], "only the error span's trace is kept");
}

/// What each series gained, as tail_sample wrote it: (name, status) -> (calls, sum_ms,
/// buckets, exemplar trace ids).
type Written = std::collections::BTreeMap<(String, u8), (u64, f64, Vec<u64>, Vec<[u8; 16]>)>;

fn series_written(queue: &Queue) -> Written {
    let rtxn = queue.read().unwrap();
    let mut out = Written::new();
    for entry in queue.entries_after(&rtxn, Edge::SpanSummaries, 0).unwrap() {
        let (_, value) = entry.unwrap();
        let batch = batch::access_series_deltas(value).unwrap();
        for delta in batch.series.iter() {
            let entry = out
                .entry((delta.name.to_string(), delta.status_code))
                .or_insert_with(|| (0, 0.0, vec![0; delta.buckets.len()], Vec::new()));
            entry.0 += delta.calls.to_native();
            entry.1 += delta.sum_ms.to_native();
            for (total, count) in entry.2.iter_mut().zip(delta.buckets.iter()) {
                *total += count.to_native();
            }
            assert!(delta.exemplars.len() <= 2, "at most the configured exemplars per series and step");
            entry.3.extend(delta.exemplars.iter().map(|e| e.trace_id));
        }
    }
    out
}

#[test]
fn every_decided_span_is_counted_once_in_its_series_and_exemplars_are_kept_spans() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    let mut policy = policy();
    policy.spanmetrics =
        super::summaries::SeriesSettings { bounds_ms: vec![2.0, 10.0], exemplars: 2, ..Default::default() };
    // 30 traces of a root ("GET /", 1 ms) and a child ("SELECT", 5 ms; in ERROR in every third
    // trace, which keeps it), in two batches; a late span of trace 3 (kept) after the decisions.
    let traces: Vec<u8> = (1..=30).collect();
    let fill = |queue: &Queue| {
        for half in traces.chunks(15) {
            let spans = half
                .iter()
                .flat_map(|&t| {
                    let root = SpanRecord { name: "GET /".into(), ..span(t, 1, true, false) };
                    let child = SpanRecord {
                        name: "SELECT".into(),
                        end_unix_nano: T0 + 5_000_000,
                        ..span(t, 2, false, t.is_multiple_of(3))
                    };
                    [root, child]
                })
                .collect();
            append(queue, spans);
        }
    };
    let late = || SpanRecord { name: "SELECT".into(), end_unix_nano: T0 + 20_000_000, ..span(3, 9, false, false) };
    fill(&queue);
    let mut sampler = Sampler::open(&queue, policy.clone()).unwrap();
    while sampler.step(&queue, T0 + 60_000_000_000).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), 0);
    append(&queue, vec![late()]);
    while sampler.step(&queue, T0 + 61_000_000_000).unwrap().more_input {}
    let written = series_written(&queue);
    let kept_traces: Vec<[u8; 16]> = traces.iter().filter(|t| t.is_multiple_of(3)).map(|t| [*t; 16]).collect();
    // Roots: 30 calls of 1 ms, all in (0, 2]; kept roots give exemplars, two per step at most.
    let root = &written[&("GET /".to_string(), 0)];
    assert_eq!((root.0, root.2.clone()), (30, vec![30, 0, 0]));
    assert!((root.1 - 30.0).abs() < 1e-9);
    // Children: 20 fast successes + the late one (20 ms, over every bound), 10 errors.
    let ok = &written[&("SELECT".to_string(), 0)];
    assert_eq!((ok.0, ok.2.clone()), (21, vec![0, 20, 1]));
    assert!((ok.1 - 120.0).abs() < 1e-9);
    let errors = &written[&("SELECT".to_string(), batch::STATUS_CODE_ERROR)];
    assert_eq!((errors.0, errors.2.clone()), (10, vec![0, 10, 0]));
    for (_, _, _, exemplars) in written.values() {
        assert!(!exemplars.is_empty());
        assert!(exemplars.iter().all(|e| kept_traces.contains(e)), "an exemplar from a dropped trace: {exemplars:?}");
    }
    // `source: kept` counts the kept traces' spans only.
    let dir = tempfile::tempdir().unwrap();
    let kept_only = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
    fill(&kept_only);
    append(&kept_only, vec![late()]);
    policy.spanmetrics.kept_only = true;
    let mut sampler = Sampler::open(&kept_only, policy).unwrap();
    while sampler.step(&kept_only, T0 + 60_000_000_000).unwrap().more_input {}
    assert_eq!(sampler.pending_traces(), 0);
    let written = series_written(&kept_only);
    assert_eq!(written[&("GET /".to_string(), 0)].0, 10);
    assert_eq!(written[&("SELECT".to_string(), batch::STATUS_CODE_ERROR)].0, 10);
    assert_eq!(written.get(&("SELECT".to_string(), 0)).map(|w| w.0), Some(1), "the late span of kept trace 3");
}

/// Spans are counted for spanmetrics when ingested (`source: all`) or when their trace is kept
/// (`source: kept`): spans still pending when the rule changes are counted once, never twice.
#[test]
fn a_change_of_counting_rule_counts_every_pending_span_once() {
    let settings = |kept_only| super::summaries::SeriesSettings {
        bounds_ms: vec![2.0, 10.0],
        exemplars: 2,
        kept_only,
        ..Default::default()
    };
    // 30 traces of a root and a child (in ERROR in every third trace, which keeps it).
    let fill = |queue: &Queue| {
        let spans = (1..=30u8)
            .flat_map(|t| {
                let root = SpanRecord { name: "GET /".into(), ..span(t, 1, true, false) };
                let child = SpanRecord { name: "SELECT".into(), ..span(t, 2, false, t.is_multiple_of(3)) };
                [root, child]
            })
            .collect();
        append(queue, spans);
    };
    let calls = |queue: &Queue| -> u64 { series_written(queue).values().map(|w| w.0).sum() };
    for (before, after, counted) in [(false, true, 60), (true, false, 60), (false, false, 60), (true, true, 20)] {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 64 << 20, ..Default::default() }).unwrap();
        fill(&queue);
        // Ingested under the first rule, nothing due yet; then a restart under the second.
        let mut sampler = Sampler::open(&queue, Policy { spanmetrics: settings(before), ..policy() }).unwrap();
        while sampler.step(&queue, T0 + 1).unwrap().more_input {}
        assert_eq!(sampler.pending_traces(), 30);
        assert_eq!(calls(&queue), if before { 0 } else { 60 }, "source: all counts spans as they come in");
        drop(sampler);
        let mut sampler = Sampler::open(&queue, Policy { spanmetrics: settings(after), ..policy() }).unwrap();
        while sampler.step(&queue, T0 + 60_000_000_000).unwrap().more_input {}
        assert_eq!(sampler.pending_traces(), 0);
        // New spans after the change follow the new rule.
        fill(&queue);
        while sampler.step(&queue, T0 + 120_000_000_000).unwrap().more_input {}
        let new = if after { 20 } else { 60 };
        assert_eq!(calls(&queue), counted + new, "kept_only {before} -> {after}");
        let written = series_written(&queue);
        let exemplars: Vec<[u8; 16]> = written.values().flat_map(|w| w.3.iter().copied()).collect();
        assert!(!exemplars.is_empty() && exemplars.iter().all(|t| t[0] % 3 == 0), "{exemplars:?}");
    }
}
