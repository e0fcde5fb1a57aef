//! The decisions table: tail_sample's verdict per trace, published for log_mirror and for
//! tail_sample's own recovery.
//!
//! Layout: `decisions`: `trace_id (16 bytes) -> decided_unix_ms (u64 BE) ++ last_seq (u64 BE) ++
//! keep (u8)`; `decision_expiry`: `decided_unix_ms (u64 BE) ++ trace_id -> keep (u8)`, an index
//! in decision order so pruning is a scan from the front, and log_mirror's feed of new decisions
//! (the verdict in the entry spares it a lookup per decided trace; entries written before the
//! verdict was carried are empty, and their reader looks the decision up).
//!
//! Invariants:
//! - A decision is written in the same transaction that emits (or drops) the trace's spans.
//! - `last_seq` is the highest `spans` sequence number holding a span of the trace that was
//!   handled under this decision. A decision is pruned only once it is older than the TTL *and*
//!   `last_seq` is at or below tail_sample's cursor, so a restart that re-reads the batches past
//!   the cursor always finds the decision for every span it already handled.

//!
//! The sampler's watermark (`meta` key [`SAMPLER_WATERMARK_KEY`], written by tail_sample in every
//! transaction that ingests or decides) tells log_mirror how far the sampler has got in
//! receive-time terms: [`Queue::decided_through`] is the receive time up to which every span
//! has been decided. log_mirror measures `max_wait` on that clock, not on its own, so a record
//! waits as long as the sampler is down, restarting or replaying a backlog.

use heed::RoTxn;
use heed::RwTxn;

use crate::queue::{Queue, QueueError};
use crate::topology::Edge;

/// Meta key where log_mirror records the receive time (Unix ns) of the oldest log batch it has
/// not fully resolved (or of the last one it read, when none waits). tail_sample keeps
/// decisions log_mirror may still need: while logs are waiting, a decision is pruned only once
/// it is older than this progress minus the TTL.
pub const LOG_MIRROR_PROGRESS_KEY: &str = "log_mirror/progress_unix_nano";

/// Meta key of the adaptive latency thresholds ([`RouteThresholds`]).
pub const ROUTE_THRESHOLDS_KEY: &str = "tail_sample/route_thresholds";

/// The latency thresholds an adaptive `latency` policy has lifted, per route (routes at the
/// base threshold are absent), written by tail_sample when one changes; log_mirror judges
/// traceless records of a route by them, the supervisor exports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteThresholds {
    /// Route -> current threshold, milliseconds.
    pub routes: std::collections::BTreeMap<String, u64>,
    /// Changes made since the queue was created (each lift or step back of one route).
    pub changes: u64,
}

impl RouteThresholds {
    /// `changes (u64 BE) ++ [len (u16 BE) ++ route ++ threshold_ms (u64 BE)]*`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.changes.to_be_bytes().to_vec();
        for (route, ms) in &self.routes {
            let bytes = &route.as_bytes()[..route.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
            out.extend_from_slice(&ms.to_be_bytes());
        }
        out
    }

    /// The inverse of [`RouteThresholds::encode`].
    pub fn decode(raw: &[u8]) -> Option<RouteThresholds> {
        let word = |at: usize| Some(u64::from_be_bytes(raw.get(at..at + 8)?.try_into().ok()?));
        let mut out = RouteThresholds { changes: word(0)?, ..RouteThresholds::default() };
        let mut at = 8;
        while at < raw.len() {
            let len = usize::from(u16::from_be_bytes(raw.get(at..at + 2)?.try_into().ok()?));
            let route = std::str::from_utf8(raw.get(at + 2..at + 2 + len)?).ok()?.to_owned();
            out.routes.insert(route, word(at + 2 + len)?);
            at += 2 + len + 8;
        }
        Some(out)
    }
}

/// Which decisions [`Queue::prune_decisions_by`] deletes.
#[derive(Debug, Clone, Copy)]
pub struct PruneRule {
    /// Drop decisions made before this (Unix ms, pipeline time) go.
    pub drops_before_ms: u64,
    /// Every decision made before this goes.
    pub all_before_ms: u64,
    /// tail_sample's cursor: a decision with a span past it stays.
    pub cursor: u64,
    /// Most decisions deleted per call.
    pub limit: usize,
}

/// Meta key of tail_sample's ingestion position: the last `spans` sequence number it has read.
pub const SAMPLER_READ_POS_KEY: &str = "tail_sample/read_pos";

/// Meta key of tail_sample's [`SamplerWatermark`].
pub const SAMPLER_WATERMARK_KEY: &str = "tail_sample/watermark";

/// How far tail_sample has got, in receive-time terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerWatermark {
    /// Receive time (Unix ns) of the first span of the oldest trace still pending; `u64::MAX`
    /// when none is pending.
    pub oldest_pending: u64,
    /// Receive time (Unix ns) of the last `spans` batch read.
    pub ingested_until: u64,
}

impl SamplerWatermark {
    fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.oldest_pending.to_be_bytes());
        out[8..].copy_from_slice(&self.ingested_until.to_be_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Option<SamplerWatermark> {
        let raw: [u8; 16] = raw.try_into().ok()?;
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&raw[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        Some(SamplerWatermark { oldest_pending: word(0), ingested_until: word(8) })
    }
}

/// A trace's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Keep (export) or drop the trace.
    pub keep: bool,
    /// When it was decided, Unix milliseconds.
    pub decided_unix_ms: u64,
    /// Highest `spans` sequence number holding a span handled under this decision.
    pub last_seq: u64,
    /// The sampling policy that kept the trace (its index in the configuration), so late spans
    /// carry the same reason; `None` for a drop or a decision stored before policies.
    pub policy: Option<u8>,
}

impl Decision {
    fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&self.decided_unix_ms.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_seq.to_be_bytes());
        // 0: drop; 1: keep (no reason recorded); 2 + i: kept by policy i.
        out[16] = match (self.keep, self.policy) {
            (false, _) => 0,
            (true, None) => 1,
            (true, Some(policy)) => policy.saturating_add(2),
        };
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
        Some(Decision {
            decided_unix_ms: word(0),
            last_seq: word(8),
            keep: raw[16] != 0,
            policy: raw[16].checked_sub(2),
        })
    }
}

/// An entry of the decision-time index, as [`Queue::decisions_since`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDecision {
    /// When the trace was decided, Unix milliseconds.
    pub decided_unix_ms: u64,
    /// The trace.
    pub trace_id: [u8; 16],
    /// The verdict, when the entry carries it.
    pub keep: Option<bool>,
}

fn expiry_key(decided_unix_ms: u64, trace_id: &[u8; 16]) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&decided_unix_ms.to_be_bytes());
    key[8..].copy_from_slice(trace_id);
    key
}

impl Queue {
    /// Records tail_sample's watermark (in the transaction of the step it describes).
    pub fn set_sampler_watermark(&self, wtxn: &mut RwTxn<'_>, mark: &SamplerWatermark) -> Result<(), QueueError> {
        self.put_meta(wtxn, SAMPLER_WATERMARK_KEY, &mark.encode())
    }

    /// tail_sample's last recorded watermark.
    pub fn sampler_watermark(&self, txn: &RoTxn<'_>) -> Result<Option<SamplerWatermark>, QueueError> {
        Ok(self.get_meta(txn, SAMPLER_WATERMARK_KEY)?.and_then(SamplerWatermark::decode))
    }

    /// The receive time (Unix ns) up to which every span has been decided: before the oldest
    /// pending trace's first span, and, while `spans` holds batches the sampler has not read,
    /// no later than the last batch it read. With nothing pending and nothing unread, `now`.
    pub fn decided_through(&self, txn: &RoTxn<'_>, now_unix_nano: u64) -> Result<u64, QueueError> {
        let mark =
            self.sampler_watermark(txn)?.unwrap_or(SamplerWatermark { oldest_pending: u64::MAX, ingested_until: 0 });
        let read_pos = self.meta_u64(txn, SAMPLER_READ_POS_KEY)?.unwrap_or(0);
        let last_seq = self.depth(txn, Edge::Spans)?.next_seq.saturating_sub(1);
        let input_bound = if last_seq > read_pos { mark.ingested_until } else { now_unix_nano };
        Ok(mark.oldest_pending.saturating_sub(1).min(input_bound))
    }

    /// Trace ids decided at or after `from_unix_ms`, in decision order, with the decision time
    /// and the verdict (`None` for an entry that does not carry it: look the decision up).
    pub fn decisions_since(&self, txn: &RoTxn<'_>, from_unix_ms: u64) -> Result<Vec<NewDecision>, QueueError> {
        let start = expiry_key(from_unix_ms, &[0u8; 16]);
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Unbounded);
        let mut out = Vec::new();
        for entry in self.decision_expiry.range(txn, &range)? {
            let (key, stored) = entry?;
            if key.len() != 24 {
                continue;
            }
            let (decided_unix_ms, trace_id) = split_expiry_key(key);
            let keep = match crate::queue::unseal(key, stored) {
                Some([verdict]) => Some(*verdict != 0),
                _ => None,
            };
            out.push(NewDecision { decided_unix_ms, trace_id, keep });
        }
        Ok(out)
    }

    /// The time (Unix ms) of the newest decision recorded.
    pub fn last_decision_ms(&self, txn: &RoTxn<'_>) -> Result<Option<u64>, QueueError> {
        Ok(self.decision_expiry.last(txn)?.filter(|(key, _)| key.len() == 24).map(|(key, _)| split_expiry_key(key).0))
    }

    /// The decision for `trace_id`, if one is recorded.
    pub fn decision(&self, txn: &RoTxn<'_>, trace_id: &[u8; 16]) -> Result<Option<Decision>, QueueError> {
        match self.get_sealed(self.decisions, "decisions", txn, trace_id)? {
            None => Ok(None),
            Some(raw) => Decision::decode(raw)
                .map(Some)
                .ok_or_else(|| QueueError::Damaged { table: "decisions", key: trace_id.to_vec() }),
        }
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
        self.put_sealed(self.decisions, wtxn, trace_id, &decision.encode())?;
        let verdict = [u8::from(decision.keep)];
        self.put_sealed(self.decision_expiry, wtxn, &expiry_key(decision.decided_unix_ms, trace_id), &verdict)?;
        Ok(())
    }

    /// Records the decision of a trace that has none stored (no previous entry to replace:
    /// the lookup [`Queue::put_decision`] makes is skipped).
    pub fn put_new_decision(
        &self,
        wtxn: &mut RwTxn<'_>,
        trace_id: &[u8; 16],
        decision: &Decision,
    ) -> Result<(), QueueError> {
        self.put_sealed(self.decisions, wtxn, trace_id, &decision.encode())?;
        // Decisions are stamped with the pipeline clock, which only moves forward, and a step
        // records its new ones in key order: the expiry index grows at its end.
        let verdict = [u8::from(decision.keep)];
        self.put_sealed_last(self.decision_expiry, wtxn, &expiry_key(decision.decided_unix_ms, trace_id), &verdict)?;
        Ok(())
    }

    /// Deletes up to `limit` decisions made before `before_unix_ms` whose spans are all at or
    /// below `cursor`, kept or dropped alike (see [`Queue::prune_decisions_by`]).
    pub fn prune_decisions(
        &self,
        wtxn: &mut RwTxn<'_>,
        before_unix_ms: u64,
        cursor: u64,
        limit: usize,
    ) -> Result<usize, QueueError> {
        let rule = PruneRule { drops_before_ms: before_unix_ms, all_before_ms: before_unix_ms, cursor, limit };
        self.prune_decisions_by(wtxn, &rule, &mut None)
    }

    /// Deletes up to `rule.limit` decisions: any made before `all_before_ms`, and drop decisions
    /// made before `drops_before_ms` (keep decisions are remembered longer, so a late span or log
    /// of a kept trace still follows it). A decision still pinned by a batch past the cursor is
    /// skipped (a trace that keeps receiving late spans must not hold back pruning of everything
    /// behind it). The drop scan resumes at `frontier` (where the previous call stopped; `None`
    /// starts at the oldest entry), so the keep decisions it passes are examined once, not at
    /// every call; at most `4 * limit` entries are examined per scan.
    pub fn prune_decisions_by(
        &self,
        wtxn: &mut RwTxn<'_>,
        rule: &PruneRule,
        frontier: &mut Option<Vec<u8>>,
    ) -> Result<usize, QueueError> {
        let mut doomed = Vec::new();
        // The oldest entries: everything past the longer retention. A damaged decision is
        // pruned like any other (verification reports damage).
        let pinned = |d: &Decision| d.last_seq > rule.cursor;
        self.collect_expired(wtxn, &[0u8], rule.all_before_ms, rule.limit, &pinned, &mut doomed)?;
        // Drop decisions past the TTL, from where the last scan stopped.
        if rule.drops_before_ms > rule.all_before_ms && doomed.len() < rule.limit {
            // The smallest key LMDB accepts (it refuses an empty one) is before every stamp.
            let from = frontier.clone().unwrap_or_else(|| vec![0u8]);
            let kept_or_pinned = |d: &Decision| d.keep || pinned(d);
            let last =
                self.collect_expired(wtxn, &from, rule.drops_before_ms, rule.limit, &kept_or_pinned, &mut doomed)?;
            if last.is_some() {
                *frontier = last;
            }
        }
        for (key, trace_id) in &doomed {
            self.decision_expiry.delete(wtxn, key)?;
            self.decisions.delete(wtxn, trace_id)?;
        }
        Ok(doomed.len())
    }

    /// Adds to `doomed` the `decision_expiry` entries from key `from` on that are stamped before
    /// `before_ms` and whose decision `stays` does not hold, until `doomed` has `limit` entries or
    /// `4 * limit` entries were examined. Returns the last key examined.
    fn collect_expired(
        &self,
        wtxn: &RwTxn<'_>,
        from: &[u8],
        before_ms: u64,
        limit: usize,
        stays: &dyn Fn(&Decision) -> bool,
        doomed: &mut Vec<(Vec<u8>, [u8; 16])>,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Unbounded);
        let budget = limit.saturating_mul(4);
        let mut last = None;
        for (examined, entry) in self.decision_expiry.range(wtxn, &range)?.enumerate() {
            let (key, _) = entry?;
            if doomed.len() >= limit || examined >= budget || key.len() != 24 {
                break;
            }
            let (stamp, trace_id) = split_expiry_key(key);
            if stamp >= before_ms {
                break;
            }
            last = Some(key.to_vec());
            if self.decision(wtxn, &trace_id).ok().flatten().is_some_and(|d| stays(&d)) {
                continue;
            }
            if !doomed.iter().any(|(k, _)| k.as_slice() == key) {
                doomed.push((key.to_vec(), trace_id));
            }
        }
        Ok(last)
    }

    /// The adaptive thresholds as last written (empty when none was lifted).
    pub fn route_thresholds(&self, txn: &RoTxn<'_>) -> Result<RouteThresholds, QueueError> {
        Ok(self.get_meta(txn, ROUTE_THRESHOLDS_KEY)?.and_then(RouteThresholds::decode).unwrap_or_default())
    }

    /// Stores the adaptive thresholds.
    pub fn set_route_thresholds(&self, wtxn: &mut RwTxn<'_>, thresholds: &RouteThresholds) -> Result<(), QueueError> {
        self.put_meta(wtxn, ROUTE_THRESHOLDS_KEY, &thresholds.encode())
    }

    /// Number of decisions stored.
    pub fn decision_count(&self, txn: &RoTxn<'_>) -> Result<u64, QueueError> {
        Ok(self.decisions.len(txn)?)
    }
}

fn split_expiry_key(key: &[u8]) -> (u64, [u8; 16]) {
    let mut stamp = [0u8; 8];
    stamp.copy_from_slice(&key[..8]);
    let mut trace_id = [0u8; 16];
    trace_id.copy_from_slice(&key[8..24]);
    (u64::from_be_bytes(stamp), trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QueueOptions;

    #[test]
    fn the_decision_time_index_carries_the_verdict_and_older_entries_fall_back_to_a_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), &QueueOptions { max_size_bytes: 16 << 20, ..Default::default() }).unwrap();
        let decision = |keep, decided_unix_ms| Decision { keep, decided_unix_ms, last_seq: 1, policy: None };
        let mut wtxn = queue.write().unwrap();
        queue.put_new_decision(&mut wtxn, &[1; 16], &decision(true, 10)).unwrap();
        queue.put_new_decision(&mut wtxn, &[2; 16], &decision(false, 11)).unwrap();
        // Updated: the index entry moves with the decision and carries the new verdict.
        queue.put_decision(&mut wtxn, &[2; 16], &decision(true, 12)).unwrap();
        // An entry as written before the verdict was carried (empty value).
        queue.put_sealed(queue.decisions, &mut wtxn, &[3; 16], &decision(false, 13).encode()).unwrap();
        queue.put_sealed(queue.decision_expiry, &mut wtxn, &expiry_key(13, &[3; 16]), &[]).unwrap();
        queue.commit(wtxn).unwrap();
        let rtxn = queue.read().unwrap();
        let seen: Vec<(u64, u8, Option<bool>)> = queue
            .decisions_since(&rtxn, 0)
            .unwrap()
            .into_iter()
            .map(|new| (new.decided_unix_ms, new.trace_id[0], new.keep))
            .collect();
        assert_eq!(seen, vec![(10, 1, Some(true)), (12, 2, Some(true)), (13, 3, None)]);
        drop(rtxn);
        // Both shapes are whole to the repair pass: nothing is deleted.
        let report = queue.repair().unwrap();
        assert!(report.records.is_empty(), "{report:?}");
        let rtxn = queue.read().unwrap();
        assert_eq!(queue.decisions_since(&rtxn, 0).unwrap().len(), 3);
    }
}
