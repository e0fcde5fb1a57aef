//! The decisions table: tail_sample's verdict per trace, published for log_mirror and for
//! tail_sample's own recovery.
//!
//! Layout: `decisions`: `trace_id (16 bytes) -> decided_unix_ms (u64 BE) ++ last_seq (u64 BE) ++
//! keep (u8)`; `decision_expiry`: `decided_unix_ms (u64 BE) ++ trace_id -> ()`, an index in
//! decision order so pruning is a scan from the front.
//!
//! Invariants:
//! - A decision is written in the same transaction that emits (or drops) the trace's spans.
//! - `last_seq` is the highest `spans` sequence number holding a span of the trace that was
//!   handled under this decision. A decision is pruned only once it is older than the TTL *and*
//!   `last_seq` is at or below tail_sample's cursor, so a restart that re-reads the batches past
//!   the cursor always finds the decision for every span it already handled.

use heed::RoTxn;
/// Meta key where log_mirror records the receive time (Unix ns) of the last log batch it
/// resolved. tail_sample keeps decisions log_mirror may still need: while logs are waiting, a
/// decision is pruned only once it is older than this progress minus the TTL.
pub const LOG_MIRROR_PROGRESS_KEY: &str = "log_mirror/progress_unix_nano";

use heed::RwTxn;

use crate::queue::{Queue, QueueError};

/// A trace's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Keep (export) or drop the trace.
    pub keep: bool,
    /// When it was decided, Unix milliseconds.
    pub decided_unix_ms: u64,
    /// Highest `spans` sequence number holding a span handled under this decision.
    pub last_seq: u64,
}

impl Decision {
    fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&self.decided_unix_ms.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_seq.to_be_bytes());
        out[16] = u8::from(self.keep);
        out
    }

    fn decode(raw: &[u8]) -> Option<Decision> {
        if raw.len() != 17 {
            return None;
        }
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&raw[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        Some(Decision { decided_unix_ms: word(0), last_seq: word(8), keep: raw[16] == 1 })
    }
}

fn expiry_key(decided_unix_ms: u64, trace_id: &[u8; 16]) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&decided_unix_ms.to_be_bytes());
    key[8..].copy_from_slice(trace_id);
    key
}

impl Queue {
    /// The decision for `trace_id`, if one is recorded.
    pub fn decision(&self, txn: &RoTxn<'_>, trace_id: &[u8; 16]) -> Result<Option<Decision>, QueueError> {
        Ok(self.decisions.get(txn, trace_id)?.and_then(Decision::decode))
    }

    /// Records (or updates) a decision.
    pub fn put_decision(
        &self,
        wtxn: &mut RwTxn<'_>,
        trace_id: &[u8; 16],
        decision: &Decision,
    ) -> Result<(), QueueError> {
        if let Some(previous) = self.decision(wtxn, trace_id)?
            && previous.decided_unix_ms != decision.decided_unix_ms
        {
            self.decision_expiry.delete(wtxn, &expiry_key(previous.decided_unix_ms, trace_id))?;
        }
        self.decisions.put(wtxn, trace_id, &decision.encode())?;
        self.decision_expiry.put(wtxn, &expiry_key(decision.decided_unix_ms, trace_id), &[])?;
        Ok(())
    }

    /// Deletes up to `limit` decisions made before `before_unix_ms` whose spans are all at or
    /// below `cursor`. A decision still pinned by a batch past the cursor is skipped (a trace
    /// that keeps receiving late spans must not hold back pruning of everything behind it); at
    /// most `4 * limit` expired entries are examined per call.
    pub fn prune_decisions(
        &self,
        wtxn: &mut RwTxn<'_>,
        before_unix_ms: u64,
        cursor: u64,
        limit: usize,
    ) -> Result<usize, QueueError> {
        let mut doomed = Vec::new();
        for (examined, entry) in self.decision_expiry.iter(wtxn)?.enumerate() {
            let (key, _) = entry?;
            if doomed.len() >= limit || examined >= limit.saturating_mul(4) || key.len() != 24 {
                break;
            }
            let mut stamp = [0u8; 8];
            stamp.copy_from_slice(&key[..8]);
            if u64::from_be_bytes(stamp) >= before_unix_ms {
                break;
            }
            let mut trace_id = [0u8; 16];
            trace_id.copy_from_slice(&key[8..]);
            let decision = self.decisions.get(wtxn, &trace_id)?.and_then(Decision::decode);
            if decision.is_some_and(|d| d.last_seq > cursor) {
                continue;
            }
            doomed.push((key.to_vec(), trace_id));
        }
        for (key, trace_id) in &doomed {
            self.decision_expiry.delete(wtxn, key)?;
            self.decisions.delete(wtxn, trace_id)?;
        }
        Ok(doomed.len())
    }

    /// Number of decisions stored.
    pub fn decision_count(&self, txn: &RoTxn<'_>) -> Result<u64, QueueError> {
        Ok(self.decisions.len(txn)?)
    }
}
