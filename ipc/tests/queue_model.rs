//! Model and crash tests of the LMDB queue: append/advance/reopen against an in-memory model, a
//! full map, stale cursors, decisions pruning, corrupt entries, and a writer process killed with
//! SIGKILL at random moments.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use heed::RoTxn;
use proptest::prelude::*;
use tailgate_ipc::batch::{self, BatchHeader, MetricBatch, SpanBatch, SpanRecord};
use tailgate_ipc::decisions::{Decision, PruneRule};
use tailgate_ipc::{Consumer, Edge, EdgeDepth, Queue, QueueError, QueueOptions};

const MIB: u64 = 1 << 20;

fn open(dir: &Path, max_size_bytes: u64) -> Queue {
    Queue::open(dir, &QueueOptions { max_size_bytes, ..QueueOptions::default() }).unwrap()
}

/// Every stored entry of `edge` after `after`, copied out of the map.
fn stored(queue: &Queue, txn: &RoTxn<'_>, edge: Edge, after: u64) -> Vec<(u64, Vec<u8>)> {
    queue.entries_after(txn, edge, after).unwrap().map(|e| e.map(|(s, v)| (s, v.to_vec())).unwrap()).collect()
}

fn span_batch(tag: u64, spans: u32, body_len: usize) -> Vec<u8> {
    let spans = (0..spans)
        .map(|i| SpanRecord {
            trace_id: [tag as u8; 16],
            name: format!("{tag}-{i}"),
            body: vec![i as u8; body_len],
            ..SpanRecord::default()
        })
        .collect();
    batch::encode_spans(&SpanBatch { received_unix_nano: tag, spans, ..SpanBatch::default() }).unwrap()
}

fn metric_batch(tag: u64, data_points: u32, requests: Vec<Vec<u8>>) -> Vec<u8> {
    batch::encode_metrics(&MetricBatch { received_unix_nano: tag, requests, data_points }).unwrap()
}

fn items_of(value: &[u8]) -> u64 {
    u64::from(BatchHeader::parse(value).unwrap().items)
}

// ---------------------------------------------------------------------------------------------
// 1. The queue against an in-memory model.

#[derive(Debug, Clone)]
enum Op {
    Append { edge: Edge, items: u32, metrics: bool },
    Advance { consumer: Consumer, by: usize },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let edge = prop::sample::select(vec![Edge::Spans, Edge::KeptLogs]);
    let consumer = prop::sample::select(vec![Consumer::TailSample, Consumer::ExportLogs, Consumer::ExportLoki]);
    prop_oneof![
        5 => (edge, 0u32..5, any::<bool>()).prop_map(|(edge, items, metrics)| Op::Append { edge, items, metrics }),
        4 => (consumer, 0usize..6).prop_map(|(consumer, by)| Op::Advance { consumer, by }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct EdgeModel {
    next_seq: u64,
    /// Entries not yet consumed by every consumer: seq -> value.
    kept: BTreeMap<u64, Vec<u8>>,
    /// Every sequence number ever handed out.
    issued: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Model {
    edges: BTreeMap<Edge, EdgeModel>,
    cursors: BTreeMap<Consumer, u64>,
}

impl Model {
    fn new() -> Model {
        let mut model = Model::default();
        for edge in [Edge::Spans, Edge::KeptLogs] {
            model.edges.insert(edge, EdgeModel { next_seq: 1, ..EdgeModel::default() });
            for consumer in edge.consumers() {
                model.cursors.insert(*consumer, 0);
            }
        }
        model
    }

    fn lowest_cursor(&self, edge: Edge) -> u64 {
        edge.consumers().iter().map(|c| self.cursors[c]).min().unwrap()
    }

    fn check(&self, queue: &Queue) {
        let txn = queue.read().unwrap();
        for (&edge, model) in &self.edges {
            let lowest = self.lowest_cursor(edge);
            let kept: Vec<(u64, Vec<u8>)> = model.kept.iter().map(|(s, v)| (*s, v.clone())).collect();
            // Deleted exactly when every consumer is past an entry, never earlier.
            assert!(kept.iter().all(|(seq, _)| *seq > lowest), "{edge:?}: model keeps a consumed entry");
            assert_eq!(stored(queue, &txn, edge, 0), kept, "{edge:?}: stored entries");
            let expected = EdgeDepth {
                next_seq: model.next_seq,
                batches: kept.len() as u64,
                items: kept.iter().map(|(_, v)| items_of(v)).sum(),
                bytes: kept.iter().map(|(_, v)| v.len() as u64).sum(),
            };
            assert_eq!(queue.depth(&txn, edge).unwrap(), expected, "{edge:?}: depth");
            for consumer in edge.consumers() {
                let cursor = self.cursors[consumer];
                assert_eq!(queue.cursor(&txn, *consumer).unwrap(), cursor, "{consumer:?}: cursor");
                let unread: Vec<_> = kept.iter().filter(|(s, _)| *s > cursor).cloned().collect();
                assert_eq!(stored(queue, &txn, edge, cursor), unread, "{consumer:?}: unread entries");
            }
        }
    }
}

fn run_model(ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let mut queue = Some(open(dir.path(), 64 * MIB));
    let mut model = Model::new();
    let mut tag = 0u64;
    for op in ops {
        let q = queue.as_ref().unwrap();
        match *op {
            Op::Append { edge, items, metrics } => {
                tag += 1;
                let value = if metrics {
                    metric_batch(tag, items, vec![vec![tag as u8; items as usize]])
                } else {
                    span_batch(tag, items, 3)
                };
                let mut wtxn = q.write().unwrap();
                let seq = q.append(&mut wtxn, edge, &value).unwrap();
                q.commit(wtxn).unwrap();
                let m = model.edges.get_mut(&edge).unwrap();
                assert_eq!(seq, m.next_seq, "{edge:?}: sequence number");
                assert!(m.issued.last().is_none_or(|s| *s < seq) && m.issued.insert(seq), "{edge:?}: seq {seq} reused");
                m.next_seq += 1;
                m.kept.insert(seq, value);
            }
            Op::Advance { consumer, by } => {
                let mut wtxn = q.write().unwrap();
                let cursor = q.cursor(&wtxn, consumer).unwrap();
                let read = stored(q, &wtxn, consumer.edge(), cursor);
                let to = read.iter().take(by).map(|e| e.0).max().unwrap_or(cursor);
                q.advance(&mut wtxn, consumer, cursor, to).unwrap();
                q.commit(wtxn).unwrap();
                model.cursors.insert(consumer, to);
                let edge = consumer.edge();
                let lowest = model.lowest_cursor(edge);
                model.edges.get_mut(&edge).unwrap().kept.retain(|seq, _| *seq > lowest);
            }
            Op::Reopen => {
                // LMDB opens a path once per process: every clone must be gone before reopening.
                drop(queue.take());
                queue = Some(open(dir.path(), 64 * MIB));
            }
        }
        model.check(queue.as_ref().unwrap());
    }
    // Reopen once more at the end: everything committed is durable across handles.
    drop(queue.take());
    model.check(&open(dir.path(), 64 * MIB));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_model(ops in prop::collection::vec(op(), 1..80)) {
        run_model(&ops);
    }
}

#[test]
fn sequence_numbers_survive_an_empty_edge_and_reopen() {
    // A fixed run of the model: drain the edge completely, reopen, append again.
    let append = |edge, items, metrics| Op::Append { edge, items, metrics };
    let advance = |consumer, by| Op::Advance { consumer, by };
    let ops = [
        append(Edge::Spans, 2, false),
        append(Edge::Spans, 2, false),
        append(Edge::Spans, 2, true),
        advance(Consumer::TailSample, 10),
        Op::Reopen,
        append(Edge::Spans, 1, true),
        advance(Consumer::ExportLogs, 1),
        append(Edge::KeptLogs, 1, true),
        advance(Consumer::ExportLogs, 1),
        advance(Consumer::ExportLoki, 1),
    ];
    run_model(&ops);
}

// ---------------------------------------------------------------------------------------------
// 2. A stale cursor.

#[test]
fn advance_with_stale_cursor_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let mut wtxn = q.write().unwrap();
    for tag in 1..=4 {
        q.append(&mut wtxn, Edge::KeptLogs, &span_batch(tag, 2, 1)).unwrap();
    }
    q.advance(&mut wtxn, Consumer::ExportLogs, 0, 3).unwrap();
    q.advance(&mut wtxn, Consumer::ExportLoki, 0, 1).unwrap();
    q.commit(wtxn).unwrap();

    let snapshot = |q: &Queue, txn: &RoTxn<'_>| {
        (
            stored(q, txn, Edge::KeptLogs, 0),
            q.depth(txn, Edge::KeptLogs).unwrap(),
            q.cursor(txn, Consumer::ExportLogs).unwrap(),
            q.cursor(txn, Consumer::ExportLoki).unwrap(),
        )
    };
    let before = snapshot(&q, &q.read().unwrap());
    assert_eq!(before.0.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!((before.2, before.3), (3, 1));

    let mut wtxn = q.write().unwrap();
    // A second instance that last saw the cursor at 0 must not move it (nor delete anything).
    let moved = |result: Result<(), QueueError>| match result {
        Err(QueueError::CursorMoved { consumer, expected, found }) => (consumer, expected, found),
        other => panic!("expected CursorMoved, got {other:?}"),
    };
    assert_eq!(moved(q.advance(&mut wtxn, Consumer::ExportLogs, 0, 4)), ("export_logs", 0, 3));
    assert_eq!(moved(q.advance(&mut wtxn, Consumer::ExportLoki, 2, 4)), ("export_loki", 2, 1));
    assert_eq!(snapshot(&q, &wtxn), before, "inside the transaction");
    q.commit(wtxn).unwrap();
    assert_eq!(snapshot(&q, &q.read().unwrap()), before, "after commit");
}

// ---------------------------------------------------------------------------------------------
// 3. A full map.

#[test]
fn full_map_keeps_committed_data_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), MIB);
    assert_eq!(q.capacity_bytes(), MIB);
    assert!(q.admits(&q.read().unwrap()).unwrap());
    let threshold = MIB as f64 * tailgate_ipc::queue::INTAKE_STOP_RATIO;

    let mut refused_before_full = false;
    let mut committed_rounds = 0u64;
    let mut tag = 0u64;
    let full = loop {
        assert!(committed_rounds < 1000, "the map never filled up");
        {
            let txn = q.read().unwrap();
            let used = q.used_bytes(&txn).unwrap() as f64;
            let admits = q.admits(&txn).unwrap();
            assert_eq!(admits, used < threshold, "admits() at {used} bytes used");
            refused_before_full |= !admits;
        }
        let before = {
            let txn = q.read().unwrap();
            (
                stored(&q, &txn, Edge::Spans, 0),
                q.depth(&txn, Edge::Spans).unwrap(),
                q.meta_u64(&txn, "test/round").unwrap(),
            )
        };
        // Two appends and a meta write in one transaction: all of it or nothing.
        let mut wtxn = q.write().unwrap();
        let result = (|| {
            for _ in 0..2 {
                tag += 1;
                q.append(&mut wtxn, Edge::Spans, &span_batch(tag, 1, 5000))?;
            }
            q.set_meta_u64(&mut wtxn, "test/round", committed_rounds + 1)
        })();
        let result = match result {
            Ok(()) => q.commit(wtxn),
            Err(err) => Err(err), // dropping the transaction aborts it
        };
        match result {
            Ok(()) => committed_rounds += 1,
            Err(QueueError::Full) => break before,
            Err(other) => panic!("unexpected error {other}"),
        }
    };
    assert!(committed_rounds > 10, "only {committed_rounds} rounds fit");
    assert!(refused_before_full, "admits() never said no before the map was full");

    let txn = q.read().unwrap();
    assert!(!q.admits(&txn).unwrap());
    let after = (
        stored(&q, &txn, Edge::Spans, 0),
        q.depth(&txn, Edge::Spans).unwrap(),
        q.meta_u64(&txn, "test/round").unwrap(),
    );
    assert_eq!(after, full, "the failed transaction changed committed data");
    assert_eq!(after.2, Some(committed_rounds));
    assert_eq!(after.1.batches, 2 * committed_rounds);
    assert_eq!(q.verify().unwrap().corrupt, Vec::<(&str, u64)>::new());
    let last = after.0.last().unwrap().0;
    drop(txn);

    // The consumer catches up; the entries go and intake is admitted again.
    let mut wtxn = q.write().unwrap();
    q.advance(&mut wtxn, Consumer::TailSample, 0, last).unwrap();
    q.commit(wtxn).unwrap();
    let txn = q.read().unwrap();
    assert!(q.admits(&txn).unwrap());
    let depth = q.depth(&txn, Edge::Spans).unwrap();
    assert_eq!(depth, EdgeDepth { next_seq: last + 1, batches: 0, items: 0, bytes: 0 });
    drop(txn);
    // LMDB reuses pages freed by transaction N only from transaction N+2 on (the previous
    // snapshot stays readable), so after a completely full map intake may need one more
    // committed write before the freed pages are available.
    let value = span_batch(0, 1, 5000);
    let mut wtxn = q.write().unwrap();
    match q.append(&mut wtxn, Edge::Spans, &value) {
        Ok(seq) => assert_eq!(seq, last + 1),
        Err(QueueError::Full) => {
            drop(wtxn);
            let mut other = q.write().unwrap();
            q.set_meta_u64(&mut other, "test/round", 0).unwrap();
            q.commit(other).unwrap();
            wtxn = q.write().unwrap();
            assert_eq!(q.append(&mut wtxn, Edge::Spans, &value).unwrap(), last + 1);
        }
        Err(other) => panic!("unexpected error {other}"),
    }
    q.commit(wtxn).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Decisions.

/// New decisions go to the end of the expiry index without a search when they sort last, and
/// in place when they do not (a step's ids after a later one's at the same millisecond): the
/// index stays in decision order either way.
#[test]
fn new_decisions_in_any_order_keep_the_expiry_index_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let decision = |decided_unix_ms| Decision { keep: false, decided_unix_ms, last_seq: 1, policy: None };
    let puts: [(u8, u64); 6] = [(5, 100), (9, 100), (2, 100), (7, 200), (1, 200), (3, 150)];
    let mut wtxn = q.write().unwrap();
    for (id, ms) in puts {
        q.put_new_decision(&mut wtxn, &[id; 16], &decision(ms)).unwrap();
    }
    q.commit(wtxn).unwrap();
    let txn = q.read().unwrap();
    let order: Vec<(u64, u8)> =
        q.decisions_since(&txn, 0).unwrap().into_iter().map(|new| (new.decided_unix_ms, new.trace_id[0])).collect();
    assert_eq!(order, vec![(100, 2), (100, 5), (100, 9), (150, 3), (200, 1), (200, 7)]);
    assert_eq!(q.decisions_since(&txn, 150).unwrap().len(), 3);
    assert_eq!(q.last_decision_ms(&txn).unwrap(), Some(200));
    for (id, ms) in puts {
        assert_eq!(q.decision(&txn, &[id; 16]).unwrap(), Some(decision(ms)));
    }
}

#[test]
fn decisions_round_trip_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let decision = |decided_unix_ms, last_seq, keep| Decision { keep, decided_unix_ms, last_seq, policy: None };
    let old_a = decision(100, 5, true); // old, below the cursor: pruned
    let old_b = decision(150, 10, false); // old, exactly at the cursor: pruned
    let pinned = decision(200, 11, true); // old, but past the cursor: kept
    let young = decision(5_000, 1, false); // newer than the cutoff: kept
    let moved = decision(6_000, 1, true); // first written at 120, then re-decided at 6000

    let mut wtxn = q.write().unwrap();
    q.put_decision(&mut wtxn, &[1; 16], &old_a).unwrap();
    q.put_decision(&mut wtxn, &[2; 16], &old_b).unwrap();
    q.put_decision(&mut wtxn, &[3; 16], &pinned).unwrap();
    q.put_decision(&mut wtxn, &[4; 16], &young).unwrap();
    q.put_decision(&mut wtxn, &[5; 16], &decision(120, 1, false)).unwrap();
    q.put_decision(&mut wtxn, &[5; 16], &moved).unwrap();
    q.commit(wtxn).unwrap();

    let txn = q.read().unwrap();
    assert_eq!(q.decision(&txn, &[1; 16]).unwrap(), Some(old_a));
    assert_eq!(q.decision(&txn, &[2; 16]).unwrap(), Some(old_b));
    assert_eq!(q.decision(&txn, &[3; 16]).unwrap(), Some(pinned));
    assert_eq!(q.decision(&txn, &[4; 16]).unwrap(), Some(young));
    assert_eq!(q.decision(&txn, &[5; 16]).unwrap(), Some(moved));
    assert_eq!(q.decision(&txn, &[9; 16]).unwrap(), None);
    assert_eq!(q.decision_count(&txn).unwrap(), 5);
    drop(txn);

    let present = |q: &Queue| -> Vec<u8> {
        let txn = q.read().unwrap();
        (1..=5u8).filter(|id| q.decision(&txn, &[*id; 16]).unwrap().is_some()).collect()
    };
    let prune = |q: &Queue, before, cursor, limit| {
        let mut wtxn = q.write().unwrap();
        let pruned = q.prune_decisions(&mut wtxn, before, cursor, limit).unwrap();
        q.commit(wtxn).unwrap();
        pruned
    };
    // The limit is honoured.
    assert_eq!(prune(&q, 1_000, 10, 1), 1);
    assert_eq!(present(&q), vec![2, 3, 4, 5]);
    // Old and at the cursor goes; old but past the cursor stays; young ones stay, including the
    // one re-decided after the cutoff (its old expiry entry must not prune it).
    assert_eq!(prune(&q, 1_000, 10, 100), 1);
    assert_eq!(present(&q), vec![3, 4, 5]);
    assert_eq!(prune(&q, 1_000, 10, 100), 0);
    assert_eq!(present(&q), vec![3, 4, 5]);
    // Once the cursor passes its last span the pinned decision goes too.
    assert_eq!(prune(&q, 1_000, 11, 100), 1);
    assert_eq!(present(&q), vec![4, 5]);
    // A later cutoff reaches the young ones.
    assert_eq!(prune(&q, 5_001, 11, 100), 1);
    assert_eq!(present(&q), vec![5]);
    assert_eq!(prune(&q, 6_001, 11, 100), 1);
    assert_eq!(q.decision_count(&q.read().unwrap()).unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Corrupt entries.

#[test]
fn verify_reports_corrupt_entries() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let good = span_batch(1, 3, 4);
    let mut bad = good[..batch::HEADER_LEN].to_vec();
    bad.extend_from_slice(&[0xab; 64]);
    assert_eq!(batch::verify(&good).unwrap().items, 3);
    assert_eq!(BatchHeader::parse(&bad).unwrap().items, 3);
    assert!(matches!(batch::verify(&bad), Err(batch::BatchError::Checksum { .. })));

    let mut wtxn = q.write().unwrap();
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &good).unwrap(), 1);
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &bad).unwrap(), 2);
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &good).unwrap(), 3);
    assert_eq!(q.append(&mut wtxn, Edge::Metrics, &metric_batch(1, 2, vec![vec![1]])).unwrap(), 1);
    assert_eq!(q.append(&mut wtxn, Edge::KeptLogs, &bad).unwrap(), 1);
    // A value without a valid header is refused outright.
    assert!(matches!(q.append(&mut wtxn, Edge::Spans, &[1, 0, 9, 0]), Err(QueueError::Corrupt { seq: 0, .. })));
    assert!(matches!(q.append(&mut wtxn, Edge::Spans, &[7; 16]), Err(QueueError::Corrupt { seq: 0, .. })));
    q.commit(wtxn).unwrap();

    let report = q.verify().unwrap();
    assert_eq!(report.entries, 5);
    assert_eq!(report.corrupt, vec![("spans", 2), ("kept_logs", 1)]);

    // The corrupt entry still counts and is deleted like any other once consumed.
    let txn = q.read().unwrap();
    assert_eq!(q.depth(&txn, Edge::Spans).unwrap().items, 9);
    drop(txn);
    let mut wtxn = q.write().unwrap();
    q.advance(&mut wtxn, Consumer::TailSample, 0, 2).unwrap();
    q.commit(wtxn).unwrap();
    let txn = q.read().unwrap();
    let depth = q.depth(&txn, Edge::Spans).unwrap();
    assert_eq!((depth.batches, depth.items, depth.bytes), (1, 3, good.len() as u64));
    drop(txn);
    let report = q.verify().unwrap();
    assert_eq!((report.entries, report.corrupt), (3, vec![("kept_logs", 1)]));
}

// ---------------------------------------------------------------------------------------------
// 6. A writer process killed with SIGKILL at random moments.

const CHILD_ENV: &str = "TG_IPC_CHILD";
const CHILD_DIR_ENV: &str = "TG_IPC_CHILD_DIR";
const INPUTS: u64 = 2_000;

/// The writer: when started by `writer_survives_sigkill`, moves `spans` to `kept_spans` in
/// single transactions until killed. A normal test run passes straight through.
#[test]
fn child_writer() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let dir = std::env::var_os(CHILD_DIR_ENV).unwrap();
    let q = open(Path::new(&dir), 64 * MIB);
    let parent = std::os::unix::process::parent_id();
    let started = Instant::now();
    // Never outlive the parent (or a run gone wrong).
    while std::os::unix::process::parent_id() == parent && started.elapsed() < Duration::from_secs(120) {
        let mut wtxn = q.write().unwrap();
        let cursor = q.cursor(&wtxn, Consumer::TailSample).unwrap();
        let mut seqs = Vec::new();
        let mut items = 0u64;
        for entry in q.entries_after(&wtxn, Edge::Spans, cursor).unwrap().take(16) {
            let (seq, value) = entry.unwrap();
            items += items_of(value);
            seqs.push(seq);
        }
        let Some(&last) = seqs.last() else {
            drop(wtxn);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let requests = seqs.iter().map(|s| s.to_be_bytes().to_vec()).collect();
        let output = metric_batch(last, u32::try_from(items).unwrap(), requests);
        q.append(&mut wtxn, Edge::KeptLogs, &output).unwrap();
        q.advance(&mut wtxn, Consumer::TailSample, cursor, last).unwrap();
        q.commit(wtxn).unwrap();
    }
}

/// Kills and reaps the child when dropped, so a failing parent leaves no writer behind.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(dir: &Path) -> ChildGuard {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["child_writer", "--exact", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, "1")
            .env(CHILD_DIR_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        ChildGuard(child)
    }

    fn kill(mut self) {
        assert_eq!(self.0.try_wait().unwrap(), None, "the writer exited on its own");
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

/// xorshift64*: enough randomness for kill moments without another dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn tail_cursor(q: &Queue) -> u64 {
    q.cursor(&q.read().unwrap(), Consumer::TailSample).unwrap()
}

/// Waits (bounded, no assertion on speed) until the writer's cursor passes `beyond`.
fn wait_for_cursor(q: &Queue, child: &mut ChildGuard, beyond: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tail_cursor(q) <= beyond {
        assert_eq!(child.0.try_wait().unwrap(), None, "the writer exited on its own");
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn writer_survives_sigkill() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("writer_survives_sigkill seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let mut child = ChildGuard::spawn(dir.path());
    let mut kills = 0;
    let mut restart = |q: &Queue, child: ChildGuard, rng: &mut Rng| {
        std::thread::sleep(Duration::from_micros(rng.below(3_000)));
        child.kill();
        kills += 1;
        q.clear_stale_readers().unwrap();
        ChildGuard::spawn(dir.path())
    };

    // Input batch i carries i items, so every input is accounted for by its item count too.
    let mut appended = 0u64;
    while appended < INPUTS {
        let round = (1 + rng.below(300)).min(INPUTS - appended);
        for _ in 0..round {
            appended += 1;
            let mut wtxn = q.write().unwrap();
            let seq = q.append(&mut wtxn, Edge::Spans, &metric_batch(appended, appended as u32, vec![])).unwrap();
            assert_eq!(seq, appended);
            q.commit(wtxn).unwrap();
        }
        // Kill once the writer is busy: it has moved since this instance started.
        let cursor = tail_cursor(&q);
        if cursor < appended {
            wait_for_cursor(&q, &mut child, cursor);
        }
        child = restart(&q, child, &mut rng);
    }
    // Kill it a few more times while it drains.
    for _ in 0..3 {
        let cursor = tail_cursor(&q);
        if cursor < INPUTS {
            wait_for_cursor(&q, &mut child, cursor);
        }
        child = restart(&q, child, &mut rng);
    }
    wait_for_cursor(&q, &mut child, INPUTS - 1);
    child.kill();
    q.clear_stale_readers().unwrap();
    assert!(kills >= 4, "only {kills} kills");

    let txn = q.read().unwrap();
    assert_eq!(q.cursor(&txn, Consumer::TailSample).unwrap(), INPUTS);
    let spans = q.depth(&txn, Edge::Spans).unwrap();
    assert_eq!((spans.next_seq, spans.batches, spans.items), (INPUTS + 1, 0, 0));
    // Neither kept_spans consumer ever advanced: every output is still there.
    assert_eq!(q.cursor(&txn, Consumer::ExportLogs).unwrap(), 0);
    let outputs = stored(&q, &txn, Edge::KeptLogs, 0);
    let mut handled = Vec::new();
    let mut total = 0u64;
    for (_, value) in &outputs {
        let view = batch::access_metrics(value).unwrap();
        let items = u64::from(view.data_points.to_native());
        let seqs: Vec<u64> =
            view.requests.iter().map(|r| u64::from_be_bytes(r.as_slice().try_into().unwrap())).collect();
        // Input seq i holds i items, so an output's items are the sum of its inputs' seqs.
        assert_eq!(items, seqs.iter().sum::<u64>());
        total += items;
        handled.extend(seqs);
    }
    // Every input handled exactly once, in order: nothing lost, nothing duplicated.
    let mut seen = vec![0u32; INPUTS as usize + 1];
    handled.iter().for_each(|seq| seen[*seq as usize] += 1);
    let lost: Vec<usize> = (1..seen.len()).filter(|s| seen[*s] == 0).collect();
    let twice: Vec<usize> = (1..seen.len()).filter(|s| seen[*s] > 1).collect();
    assert!(lost.is_empty() && twice.is_empty(), "lost inputs {lost:?}, inputs handled twice {twice:?}");
    assert!(handled.is_sorted(), "inputs handled out of order");
    assert_eq!(total, INPUTS * (INPUTS + 1) / 2);
    let kept = q.depth(&txn, Edge::KeptLogs).unwrap();
    assert_eq!((kept.batches, kept.items), (outputs.len() as u64, total));
    assert_eq!(q.verify().unwrap().corrupt, Vec::<(&str, u64)>::new());
}

#[test]
fn a_pinned_decision_does_not_hold_back_pruning_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let mut wtxn = q.write().unwrap();
    // The oldest decision keeps receiving late spans (last_seq past the cursor).
    q.put_decision(&mut wtxn, &[1; 16], &Decision { keep: true, decided_unix_ms: 10, last_seq: 99, policy: Some(3) })
        .unwrap();
    for n in 2..=20u8 {
        q.put_decision(
            &mut wtxn,
            &[n; 16],
            &Decision { keep: false, decided_unix_ms: 10 + u64::from(n), last_seq: 1, policy: None },
        )
        .unwrap();
    }
    let pruned = q.prune_decisions(&mut wtxn, 1_000, 50, 100).unwrap();
    q.commit(wtxn).unwrap();
    assert_eq!(pruned, 19);
    let txn = q.read().unwrap();
    assert_eq!(q.decision_count(&txn).unwrap(), 1);
    let kept = q.decision(&txn, &[1; 16]).unwrap().unwrap();
    assert!(kept.keep);
    assert_eq!(kept.policy, Some(3), "the policy that kept the trace survives the store");
}

#[test]
fn keep_decisions_outlive_drops_without_holding_back_their_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 64 * MIB);
    let mut wtxn = q.write().unwrap();
    // 1,000 keep decisions first, then 100 drops: far more keeps than one scan examines.
    for n in 0..1_100u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        let decision = Decision { keep: n < 1_000, decided_unix_ms: 10 + u64::from(n), last_seq: 1, policy: None };
        q.put_decision(&mut wtxn, &id, &decision).unwrap();
    }
    q.commit(wtxn).unwrap();
    // Drops past their TTL, keeps not yet past theirs: scans resume where the last one stopped,
    // so every drop goes within a bounded number of calls and every keep stays.
    let rule = PruneRule { drops_before_ms: 10_000, all_before_ms: 5, cursor: 50, limit: 25 };
    let mut frontier = None;
    let mut pruned = 0;
    for _ in 0..20 {
        let mut wtxn = q.write().unwrap();
        pruned += q.prune_decisions_by(&mut wtxn, &rule, &mut frontier).unwrap();
        q.commit(wtxn).unwrap();
    }
    assert_eq!(pruned, 100);
    let txn = q.read().unwrap();
    assert_eq!(q.decision_count(&txn).unwrap(), 1_000);
    drop(txn);
    // Past the keeps' retention they go too.
    let rule = PruneRule { all_before_ms: 10_000, ..rule };
    let mut wtxn = q.write().unwrap();
    let mut frontier = None;
    while q.prune_decisions_by(&mut wtxn, &rule, &mut frontier).unwrap() > 0 {}
    assert_eq!(q.decision_count(&wtxn).unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// Consumers without a destination.

fn log_batch(tag: u64) -> Vec<u8> {
    let logs = vec![batch::LogEntry { body: vec![tag as u8], ..batch::LogEntry::default() }];
    batch::encode_logs(&batch::LogBatch { received_unix_nano: tag, logs, ..batch::LogBatch::default() }).unwrap()
}

#[test]
fn only_active_consumers_hold_entries_back() {
    for loki_active in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let inactive = if loki_active { vec![] } else { vec![Consumer::ExportLoki] };
        let options =
            QueueOptions { max_size_bytes: 16 * MIB, inactive_consumers: inactive, ..QueueOptions::default() };
        let queue = Queue::open(dir.path(), &options).unwrap();
        let mut wtxn = queue.write().unwrap();
        for tag in 1..=3 {
            queue.append(&mut wtxn, Edge::KeptLogs, &log_batch(tag)).unwrap();
        }
        queue.advance(&mut wtxn, Consumer::ExportLogs, 0, 3).unwrap();
        queue.commit(wtxn).unwrap();
        let rtxn = queue.read().unwrap();
        let left = queue.depth(&rtxn, Edge::KeptLogs).unwrap().batches;
        assert_eq!(left, if loki_active { 3 } else { 0 }, "loki active: {loki_active}");
        let active: Vec<Consumer> = queue.active_consumers(Edge::KeptLogs).collect();
        assert_eq!(active.contains(&Consumer::ExportLoki), loki_active);
    }
}

#[test]
fn a_stale_next_seq_does_not_stop_appends() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 16 * MIB);
    let mut wtxn = q.write().unwrap();
    for tag in 1..=3 {
        q.append(&mut wtxn, Edge::Spans, &span_batch(tag, 1, 1)).unwrap();
    }
    // A torn meta page: the depth record of the edge no longer reads.
    q.set_meta_u64(&mut wtxn, "depth/spans", 0).unwrap();
    q.commit(wtxn).unwrap();
    let mut wtxn = q.write().unwrap();
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &span_batch(4, 1, 1)).unwrap(), 4);
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &span_batch(5, 1, 1)).unwrap(), 5);
    q.commit(wtxn).unwrap();
    let txn = q.read().unwrap();
    let seqs: Vec<u64> = stored(&q, &txn, Edge::Spans, 0).into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_stale_next_seq_on_an_empty_edge_stays_above_the_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), 16 * MIB);
    let mut wtxn = q.write().unwrap();
    for tag in 1..=3 {
        q.append(&mut wtxn, Edge::Spans, &span_batch(tag, 1, 1)).unwrap();
    }
    q.advance(&mut wtxn, Consumer::TailSample, 0, 3).unwrap();
    q.set_meta_u64(&mut wtxn, "depth/spans", 0).unwrap();
    q.commit(wtxn).unwrap();
    let mut wtxn = q.write().unwrap();
    // Everything was consumed and deleted: only the cursor remembers how far the edge got.
    assert_eq!(q.append(&mut wtxn, Edge::Spans, &span_batch(4, 1, 1)).unwrap(), 4);
    q.commit(wtxn).unwrap();
    let txn = q.read().unwrap();
    assert_eq!(stored(&q, &txn, Edge::Spans, 3).len(), 1, "the new batch is visible after the cursor");
}
