//! Limits and pacing every stage shares, in one place.
//!
//! Stages that read an edge in steps (tail_sample, log_mirror, spanmetrics) read at most
//! [`MAX_BATCHES_PER_STEP`] batches per write transaction, so the single LMDB writer lock is held
//! briefly; stages that write subsets of their input (tail_sample's kept spans, log_mirror's kept
//! logs) seal an output batch at [`MAX_OUTPUT_BATCH_BYTES`] of payload, so export can send a
//! batch in one request; stages whose output waits seconds anyway step at most every
//! [`MIN_STEP_INTERVAL`] unless input is backing up.

use std::time::Duration;

/// Most input batches read in one step (one write transaction).
pub const MAX_BATCHES_PER_STEP: usize = 64;

/// Steps are at least this far apart unless input is backing up: decisions take seconds anyway,
/// and one step per burst of wake-ups keeps the cost per request low at small rates (measured in
/// BENCHMARKS.md).
pub const MIN_STEP_INTERVAL: Duration = Duration::from_millis(100);

/// log_mirror steps at most this often: its records wait for decisions that take seconds, and
/// every step costs a transaction and a scan of new decisions (measured in BENCHMARKS.md).
pub const LOG_STEP_INTERVAL: Duration = Duration::from_millis(250);

/// Output batches are closed at about this many bytes of item payload, so export can send a
/// batch in one request below common gRPC message limits (4 MiB).
pub const MAX_OUTPUT_BATCH_BYTES: usize = 1 << 20;
