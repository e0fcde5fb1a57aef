//! Limits and pacing every stage shares, in one place.
//!
//! Stages that read an edge in steps (tail_sample, log_mirror, spanmetrics) read at most
//! [`MAX_BATCHES_PER_STEP`] batches per write transaction, so the single LMDB writer lock is held
//! briefly; stages that write subsets of their input (tail_sample's kept spans, log_mirror's kept
//! logs) seal an output batch at [`MAX_OUTPUT_BATCH_BYTES`] of payload, so export can send a
//! batch in one request; stages whose output waits seconds anyway step at most every
//! [`MIN_STEP_INTERVAL`] unless input is backing up.

use std::time::Duration;

use tailgate_ipc::Queue;

/// Most input batches read in one step (one write transaction).
pub const MAX_BATCHES_PER_STEP: usize = 64;

/// Most traces tail_sample decides in one step. Trace ids are random, so each decision put or
/// prune lands on its own page of the decisions table, and LMDB copies every page a transaction
/// dirties into a buffer of the process it keeps for reuse until the environment closes: the
/// largest step's page count stays in the stage's private memory for good. 512 decisions and
/// 512 prunes bound that to 4 MiB. Under load a step's fixed cost (its commit, the watermark and
/// cursor, the span-metric batch, wake-ups) is paid per 512 decisions: 256 cost 3% more CPU per
/// span at 500k spans/s; tail_sample was back at 3.4 MiB a minute after a 20 s burst at that
/// rate (BENCHMARKS.md).
pub const MAX_DECISIONS_PER_STEP: usize = 512;

/// Most stale decisions tail_sample prunes in one step (see [`MAX_DECISIONS_PER_STEP`]): pruning
/// runs in every writing step at the same bound, so under a sustained load it keeps pace with
/// the decisions made.
pub const MAX_PRUNE_PER_STEP: usize = MAX_DECISIONS_PER_STEP;

/// tail_sample's steps are at least this far apart unless input is backing up: decisions take
/// seconds anyway, and every step's transaction copies the pages its decisions land on (trace
/// ids are random, so nearly one page per decision): fewer, larger steps dirty fewer pages.
/// 100 -> 500 ms took tail_sample from 1.13% to 0.70% of a core at 5,000 spans/s (BENCHMARKS.md);
/// a decision comes at most this much after it is due.
pub const MIN_STEP_INTERVAL: Duration = Duration::from_millis(500);

/// log_mirror steps at most this often: its records wait for decisions that take seconds, and
/// every step costs a transaction and a scan of new decisions (measured in BENCHMARKS.md).
pub const LOG_STEP_INTERVAL: Duration = Duration::from_millis(250);

/// Output batches are closed at about this many bytes of item payload, so export can send a
/// batch in one request below common gRPC message limits (4 MiB).
pub const MAX_OUTPUT_BATCH_BYTES: usize = 1 << 20;

/// How long a stage may take to rebuild its index from the queue (at start, and after a failed
/// step) before its next heartbeat: it reads the backlog between its cursor and read position.
pub const REBUILD_ALLOWANCE: Duration = Duration::from_secs(60);

/// Smallest step a [`StepSizer`] shrinks to: one page of output.
pub const MIN_STEP_BYTES: usize = 4096;

/// Writing steps a [`StepSizer`] waits for before it doubles its step again.
pub const STEP_GROW_AFTER_WRITES: u32 = 32;

/// The size of a writing stage's steps (input read and output batches), adapted to the room
/// in the map. Near the disk budget free pages are scattered, and a large output value needs a
/// contiguous run of them: after a step that found no room the step halves (down to
/// [`MIN_STEP_BYTES`]); it doubles back only after [`STEP_GROW_AFTER_WRITES`] steps that
/// wrote, and only while the map has room for the larger step ([`Queue::has_room_for_step`]).
/// Steps that wrote nothing (a replay of the window after a failed step, an idle poll) say
/// nothing about the room and do not count: counting them let a stage grow back to the size
/// that had just failed while it re-read its window, and fail again forever.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepSizer {
    shift: u32,
    good_writes: u32,
}

impl StepSizer {
    /// Most bytes the next step reads (its output is at most about as large).
    pub fn limit(&self, queue: &Queue) -> usize {
        Self::limit_at(queue, self.shift)
    }

    fn limit_at(queue: &Queue, shift: u32) -> usize {
        (queue.max_step_bytes() >> shift).max(MIN_STEP_BYTES)
    }

    /// A step found no room in the map: halve the next one.
    pub fn shrink(&mut self, queue: &Queue) {
        if Self::limit_at(queue, self.shift) > MIN_STEP_BYTES {
            self.shift += 1;
        }
        self.good_writes = 0;
    }

    /// A step succeeded; `wrote` says whether it committed anything.
    pub fn stepped(&mut self, queue: &Queue, wrote: bool) {
        if !wrote || self.shift == 0 {
            return;
        }
        self.good_writes += 1;
        if self.good_writes < STEP_GROW_AFTER_WRITES {
            return;
        }
        let larger = Self::limit_at(queue, self.shift - 1);
        let room = queue.read().and_then(|txn| queue.has_room_for_step(&txn, larger as u64)).unwrap_or(false);
        if room {
            self.shift -= 1;
        }
        self.good_writes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_ipc::batch::{self, ResourceBlock, ScopeBlock, SpanBatch, SpanRecord};
    use tailgate_ipc::{Edge, QueueError, QueueOptions};

    fn queue(max_size_bytes: u64) -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes, ..Default::default() }).unwrap();
        (dir, queue)
    }

    #[test]
    fn steps_that_write_nothing_do_not_grow_the_step_back() {
        let (_dir, queue) = queue(16 << 20);
        let mut sizer = StepSizer::default();
        let full = sizer.limit(&queue);
        for _ in 0..3 {
            sizer.shrink(&queue);
        }
        assert_eq!(sizer.limit(&queue), full / 8);
        // A replay of the window after the failed step: hundreds of steps, none writes.
        for _ in 0..1000 {
            sizer.stepped(&queue, false);
        }
        assert_eq!(sizer.limit(&queue), full / 8);
        // Steps that write, with room in the map: one doubling per STEP_GROW_AFTER_WRITES.
        for _ in 0..STEP_GROW_AFTER_WRITES - 1 {
            sizer.stepped(&queue, true);
        }
        assert_eq!(sizer.limit(&queue), full / 8);
        sizer.stepped(&queue, true);
        assert_eq!(sizer.limit(&queue), full / 4);
    }

    #[test]
    fn the_step_shrinks_to_a_page_and_stays_small_while_the_map_is_full() {
        let (_dir, queue) = queue(1 << 20);
        let mut sizer = StepSizer::default();
        for _ in 0..64 {
            sizer.shrink(&queue);
        }
        assert_eq!(sizer.limit(&queue), MIN_STEP_BYTES);
        // Fill the map to its end.
        let batch = SpanBatch {
            received_unix_nano: 1,
            resources: vec![ResourceBlock::default()],
            scopes: vec![ScopeBlock::default()],
            spans: vec![SpanRecord { body: vec![7u8; 20_000], ..Default::default() }],
        };
        let value = batch::encode_spans(&batch).unwrap();
        loop {
            let mut wtxn = queue.write().unwrap();
            let appended = queue.append(&mut wtxn, Edge::Spans, &value).and_then(|_| queue.commit(wtxn));
            match appended {
                Ok(()) => {}
                Err(QueueError::Full) => break,
                Err(other) => panic!("{other}"),
            }
        }
        let txn = queue.read().unwrap();
        assert!(!queue.has_room_for_step(&txn, 2 * MIN_STEP_BYTES as u64).unwrap());
        drop(txn);
        for _ in 0..10 * STEP_GROW_AFTER_WRITES {
            sizer.stepped(&queue, true);
        }
        assert_eq!(sizer.limit(&queue), MIN_STEP_BYTES, "grew although the map has no room");
    }
}
