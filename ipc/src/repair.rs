//! Damage to the queue is repaired in the smallest unit that holds it, and every loss is recorded.
//!
//! Two entry points:
//! - [`Queue::repair`] checks every value of every table (batches by their checksum and rkyv
//!   validation, small tables by their seal) and repairs what fails, in one write transaction.
//!   The supervisor runs it before any stage starts when the last run did not end cleanly.
//! - [`Queue::repair_damage`] repairs the one entry a stage tripped over at run time
//!   ([`QueueError::is_damage`]); the stage then starts over from its durable state.
//!
//! Repairs, by what is damaged:
//! - a batch: deleted from its edge (quarantined); every other batch stays and is delivered. The
//!   edge's depth is corrected and a [`LossRecord`] names the edge, sequence number and the item
//!   count when the header still tells it;
//! - a cursor: reset to just before the oldest batch still stored on its edge, so nothing intact
//!   is skipped; the destination may receive batches it had (recorded as a redelivery);
//! - an edge's depth (`meta`): recomputed from the edge itself (checked on every full repair);
//! - any other `meta`, `state` or decision value: deleted, so its owner starts from its default
//!   (a stage position re-reads from its cursor, a decision is taken again or its logs fall back
//!   to the timeout rule);
//! - a table that cannot be walked at all (a broken B-tree page): emptied, and recorded with what
//!   its depth said it held.
//!
//! Loss records live in `meta` under `loss/` until an operator clears them
//! ([`Queue::clear_losses`]); `tailgate status` prints them.

use heed::RwTxn;

use crate::batch::{self, BatchHeader};
use crate::queue::{EdgeDepth, FORMAT_KEY, QueueError, SMALL_TABLES, Table, depth_key, key_seq, seq_key, unseal};
use crate::{Consumer, Edge, Queue};

const LOSS_PREFIX: &str = "loss/";

/// Keeps the number of records bounded when damage is widespread: past this many in one
/// repair, further damage of the same table is summed into one record.
const MAX_RECORDS_PER_TABLE: usize = 64;

/// One repair, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossRecord {
    /// When it was repaired, Unix milliseconds.
    pub at_unix_ms: u64,
    /// The table (an edge name or a small table's name).
    pub table: String,
    /// First and last sequence number affected (edges), or 0.
    pub first_seq: u64,
    /// Last sequence number affected.
    pub last_seq: u64,
    /// Batches (edges) or values (small tables) removed or reset.
    pub entries: u64,
    /// Items (spans, records, points) lost, as far as the damaged data still tells.
    pub items: u64,
    /// What was done: `quarantined`, `reset`, `deleted`, `emptied`.
    pub action: String,
    /// Why: the check that failed.
    pub reason: String,
}

impl LossRecord {
    /// A record made now: `entries` of `table` got `action`, because of `reason`; no sequence
    /// range and no items until [`LossRecord::seqs`] / [`LossRecord::items`] say so.
    fn new(table: &str, action: &str, entries: u64, reason: String) -> LossRecord {
        LossRecord {
            at_unix_ms: now_ms(),
            table: table.to_string(),
            first_seq: 0,
            last_seq: 0,
            entries,
            items: 0,
            action: action.to_string(),
            reason,
        }
    }

    /// Batch `seq` of `edge` (holding `items`) deleted as damaged.
    fn quarantined(edge: Edge, seq: u64, items: u64, reason: String) -> LossRecord {
        LossRecord::new(edge.as_str(), "quarantined", 1, reason).seqs(seq, seq).items(items)
    }

    fn seqs(self, first_seq: u64, last_seq: u64) -> LossRecord {
        LossRecord { first_seq, last_seq, ..self }
    }

    fn items(self, items: u64) -> LossRecord {
        LossRecord { items, ..self }
    }

    fn encode(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.at_unix_ms,
            self.table,
            self.first_seq,
            self.last_seq,
            self.entries,
            self.items,
            self.action,
            self.reason.replace(['\t', '\n'], " ")
        )
    }

    fn decode(raw: &[u8]) -> Option<LossRecord> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut fields = text.splitn(8, '\t');
        let mut next = || fields.next();
        Some(LossRecord {
            at_unix_ms: next()?.parse().ok()?,
            table: next()?.to_string(),
            first_seq: next()?.parse().ok()?,
            last_seq: next()?.parse().ok()?,
            entries: next()?.parse().ok()?,
            items: next()?.parse().ok()?,
            action: next()?.to_string(),
            reason: next()?.to_string(),
        })
    }
}

impl std::fmt::Display for LossRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} {} entr{}",
            self.table,
            self.action,
            self.entries,
            if self.entries == 1 { "y" } else { "ies" }
        )?;
        if self.first_seq > 0 {
            if self.first_seq == self.last_seq {
                write!(f, " (seq {})", self.first_seq)?;
            } else {
                write!(f, " (seq {}..={})", self.first_seq, self.last_seq)?;
            }
        }
        if self.items > 0 {
            write!(f, ", {} items lost", self.items)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What a full repair found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Values checked, over all tables.
    pub checked: u64,
    /// What was repaired (also stored, see [`Queue::losses`]).
    pub records: Vec<LossRecord>,
    /// Edges whose stored depth did not match their contents (corrected; not a loss).
    pub depth_corrected: Vec<Edge>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn small_table_index(name: &str) -> Option<usize> {
    SMALL_TABLES.iter().position(|table| *table == name)
}

impl Queue {
    /// Fault injection for the durability drills: flips byte `at` of the stored value of `key` in
    /// table `table` (`cursors` or `meta`), as bit rot in exactly that value would. Returns
    /// whether the value existed and was long enough.
    #[doc(hidden)]
    pub fn flip_stored_byte(&self, table: &str, key: &[u8], at: usize) -> Result<bool, QueueError> {
        let table = match table {
            "cursors" => self.cursors_table(),
            "meta" => self.meta_table(),
            _ => return Ok(false),
        };
        self.flip_in(table, key, at)
    }

    /// Flips byte `at` of the value of `key` in `table`, in a transaction of its own.
    pub(crate) fn flip_in(&self, table: Table, key: &[u8], at: usize) -> Result<bool, QueueError> {
        let mut wtxn = self.write()?;
        let Some(mut value) = table.get(&wtxn, key)?.map(<[u8]>::to_vec) else { return Ok(false) };
        let Some(byte) = value.get_mut(at) else { return Ok(false) };
        *byte ^= 0x5a;
        table.put(&mut wtxn, key, &value)?;
        self.commit(wtxn)?;
        Ok(true)
    }

    /// Checks every table and repairs what is damaged (see the module docs). Run it while no
    /// stage runs: it holds the write lock for one pass over the whole queue.
    pub fn repair(&self) -> Result<RepairReport, QueueError> {
        let mut wtxn = self.write()?;
        let mut report = RepairReport::default();
        let mut reset_cursors = Vec::new();
        for (index, name) in SMALL_TABLES.iter().enumerate() {
            let table = self.small_tables()[index];
            let walked: Result<Vec<Vec<u8>>, heed::Error> = (|| {
                let mut damaged = Vec::new();
                for entry in table.iter(&wtxn)? {
                    let (key, stored) = entry?;
                    report.checked += 1;
                    if unseal(key, stored).is_none() || !self.value_shape_ok(name, key, stored) {
                        damaged.push(key.to_vec());
                    }
                }
                Ok(damaged)
            })();
            match walked {
                Ok(damaged) => {
                    let mut summed: Option<LossRecord> = None;
                    for (n, key) in damaged.into_iter().enumerate() {
                        if *name == "cursors" {
                            table.delete(&mut wtxn, &key)?;
                            reset_cursors.push(key);
                            continue;
                        }
                        if let Some(record) = self.delete_damaged_value(&mut wtxn, name, &key)? {
                            if n < MAX_RECORDS_PER_TABLE {
                                report.records.push(record);
                            } else {
                                let sum = summed.get_or_insert_with(|| LossRecord {
                                    reason: "and more damaged values".into(),
                                    ..record.clone()
                                });
                                sum.entries += 1;
                            }
                        }
                    }
                    report.records.extend(summed);
                }
                Err(err) => {
                    table.clear(&mut wtxn)?;
                    if *name == "cursors" {
                        reset_cursors.extend(Consumer::ALL.iter().map(|c| c.as_str().as_bytes().to_vec()));
                    }
                    report.records.push(LossRecord::new(name, "emptied", 0, format!("table cannot be read: {err}")));
                }
            }
        }
        for edge in Edge::ALL {
            self.repair_edge(&mut wtxn, edge, &mut report)?;
        }
        for key in reset_cursors {
            if let Some(consumer) = Consumer::ALL.iter().find(|c| c.as_str().as_bytes() == key.as_slice()) {
                report.records.push(self.reset_cursor(&mut wtxn, *consumer)?);
            }
        }
        if self.get_meta(&wtxn, FORMAT_KEY)?.is_none() {
            self.set_meta_u64(&mut wtxn, FORMAT_KEY, crate::queue::QUEUE_FORMAT)?;
        }
        for record in &report.records {
            self.store_loss(&mut wtxn, record)?;
        }
        self.commit(wtxn)?;
        Ok(report)
    }

    /// Checks what a sealed value must look like beyond its checksum.
    fn value_shape_ok(&self, table: &str, key: &[u8], stored: &[u8]) -> bool {
        let len = stored.len().saturating_sub(4);
        match table {
            "cursors" => len == 8,
            "decisions" => key.len() == 16 && len == 17,
            // The verdict (one byte); empty in entries written before it was carried.
            "decision_expiry" => key.len() == 24 && len <= 1,
            "meta" if key.starts_with(b"depth/") => len == 32,
            _ => true,
        }
    }

    /// Walks one edge: quarantines damaged batches, or empties an edge that cannot be walked;
    /// then makes its depth match what it holds.
    fn repair_edge(&self, wtxn: &mut RwTxn<'_>, edge: Edge, report: &mut RepairReport) -> Result<(), QueueError> {
        let table = self.edge_tables()[edge as usize];
        let stored_depth = match self.get_sealed(self.meta_table(), "meta", wtxn, &depth_key(edge)) {
            Ok(Some(_)) => self.depth(wtxn, edge).ok(),
            _ => None,
        };
        let mut actual = EdgeDepth::default();
        let mut walked_all = EdgeDepth::default();
        let mut damaged = Vec::new();
        let mut last_key = 0u64;
        let walked: Result<(), heed::Error> = (|| {
            for entry in table.iter(wtxn)? {
                let (key, value) = entry?;
                report.checked += 1;
                let seq = key_seq(key);
                last_key = last_key.max(seq);
                walked_all.batches += 1;
                walked_all.bytes += value.len() as u64;
                walked_all.items += BatchHeader::parse(value).map(|h| u64::from(h.items)).unwrap_or(0);
                match batch::verify(value) {
                    Ok(header) => {
                        actual.batches += 1;
                        actual.items += u64::from(header.items);
                        actual.bytes += value.len() as u64;
                    }
                    Err(err) => damaged.push((seq, value.len(), BatchHeader::parse(value).ok(), err.to_string())),
                }
            }
            Ok(())
        })();
        if let Err(err) = walked {
            let first = table.first(wtxn).ok().flatten().map(|(key, _)| key_seq(key)).unwrap_or(0);
            table.clear(wtxn)?;
            let depth = stored_depth.unwrap_or_default();
            report.records.push(
                LossRecord::new(edge.as_str(), "emptied", depth.batches, format!("edge cannot be read: {err}"))
                    .seqs(first, depth.next_seq.saturating_sub(1).max(last_key))
                    .items(depth.items),
            );
            actual = EdgeDepth::default();
            damaged.clear();
        }
        for (seq, _, header, reason) in damaged {
            table.delete(wtxn, &seq_key(seq))?;
            let items = header.map(|h| u64::from(h.items)).unwrap_or(0);
            report.records.push(LossRecord::quarantined(edge, seq, items, reason));
        }
        let mut highest_cursor = 0;
        for consumer in edge.consumers() {
            highest_cursor = highest_cursor.max(self.cursor(wtxn, *consumer).unwrap_or(0));
        }
        actual.next_seq = stored_depth.map(|d| d.next_seq).unwrap_or(1).max(last_key + 1).max(highest_cursor + 1);
        if let Some(stored) = stored_depth
            && (stored.batches, stored.items, stored.bytes) != (walked_all.batches, walked_all.items, walked_all.bytes)
        {
            report.depth_corrected.push(edge);
        }
        if stored_depth != Some(actual) {
            self.put_depth(wtxn, edge, &actual)?;
        }
        Ok(())
    }

    /// Resets a consumer's cursor to just before the oldest batch its edge still holds.
    fn reset_cursor(&self, wtxn: &mut RwTxn<'_>, consumer: Consumer) -> Result<LossRecord, QueueError> {
        let edge = consumer.edge();
        let table = self.edge_tables()[edge as usize];
        let first = table.first(wtxn)?.map(|(key, _)| key_seq(key));
        let depth = self.depth_or_recount(wtxn, edge)?;
        let to = first.map(|seq| seq - 1).unwrap_or(depth.next_seq.saturating_sub(1));
        self.put_sealed(self.cursors_table(), wtxn, consumer.as_str().as_bytes(), &seq_key(to))?;
        let last = depth.next_seq.saturating_sub(1);
        let reason = format!(
            "cursor of {} was damaged; reset to {to}: batches it may already have delivered are delivered again",
            consumer.as_str()
        );
        let record = LossRecord::new("cursors", "reset", 1, reason);
        Ok(if last > to { record.seqs(to + 1, last) } else { record })
    }

    /// Deletes a damaged value of `meta`, `state`, `decisions` or `decision_expiry`. An edge
    /// depth is not recorded as a loss (the edge walk recomputes it).
    fn delete_damaged_value(
        &self,
        wtxn: &mut RwTxn<'_>,
        table: &str,
        key: &[u8],
    ) -> Result<Option<LossRecord>, QueueError> {
        let Some(index) = small_table_index(table) else { return Ok(None) };
        self.small_tables()[index].delete(wtxn, key)?;
        if table == "meta" && Edge::ALL.iter().any(|edge| depth_key(*edge) == key) {
            return Ok(None);
        }
        if table == "meta" && key.starts_with(LOSS_PREFIX.as_bytes()) {
            return Ok(None);
        }
        let shown = if table.starts_with("decision") {
            "a trace decision".to_string()
        } else {
            String::from_utf8_lossy(key).into_owned()
        };
        Ok(Some(LossRecord::new(
            table,
            "deleted",
            1,
            format!("damaged value of {shown}; its owner starts from the default"),
        )))
    }

    /// Repairs the damage one stage tripped over at run time; returns what was done, or `None`
    /// when `err` names no damage or the entry no longer is damaged (another process repaired it).
    pub fn repair_damage(&self, err: &QueueError) -> Result<Option<LossRecord>, QueueError> {
        let mut wtxn = self.write()?;
        let record = match err {
            QueueError::Corrupt { edge, seq, .. } if *seq > 0 => {
                let table = self.edge_tables()[*edge as usize];
                let Some(value) = table.get(&wtxn, &seq_key(*seq))? else { return Ok(None) };
                let Err(reason) = batch::verify(value) else { return Ok(None) };
                let header = BatchHeader::parse(value).ok();
                let bytes = value.len() as u64;
                table.delete(&mut wtxn, &seq_key(*seq))?;
                let mut depth = self.depth_or_recount(&wtxn, *edge)?;
                depth.batches = depth.batches.saturating_sub(1);
                depth.items = depth.items.saturating_sub(header.map(|h| u64::from(h.items)).unwrap_or(0));
                depth.bytes = depth.bytes.saturating_sub(bytes);
                depth.next_seq = depth.next_seq.max(seq + 1);
                self.put_depth(&mut wtxn, *edge, &depth)?;
                LossRecord::quarantined(
                    *edge,
                    *seq,
                    header.map(|h| u64::from(h.items)).unwrap_or(0),
                    reason.to_string(),
                )
            }
            QueueError::Damaged { table, key } => {
                let Some(index) = small_table_index(table) else { return Ok(None) };
                let Some(stored) = self.small_tables()[index].get(&wtxn, key)? else { return Ok(None) };
                if unseal(key, stored).is_some() && self.value_shape_ok(table, key, stored) {
                    return Ok(None);
                }
                if *table == "cursors" {
                    let Some(consumer) = Consumer::ALL.iter().find(|c| c.as_str().as_bytes() == key.as_slice()) else {
                        self.small_tables()[index].delete(&mut wtxn, key)?;
                        self.commit(wtxn)?;
                        return Ok(None);
                    };
                    self.reset_cursor(&mut wtxn, *consumer)?
                } else if let Some(edge) = Edge::ALL.iter().find(|edge| depth_key(**edge) == *key) {
                    self.small_tables()[index].delete(&mut wtxn, key)?;
                    let mut report = RepairReport::default();
                    self.repair_edge(&mut wtxn, *edge, &mut report)?;
                    LossRecord::new(
                        "meta",
                        "recomputed",
                        1,
                        format!("depth of {} was damaged; recomputed from the edge", edge.as_str()),
                    )
                } else {
                    match self.delete_damaged_value(&mut wtxn, table, key)? {
                        Some(record) => record,
                        None => {
                            self.commit(wtxn)?;
                            return Ok(None);
                        }
                    }
                }
            }
            _ => return Ok(None),
        };
        self.store_loss(&mut wtxn, &record)?;
        self.commit(wtxn)?;
        Ok(Some(record))
    }

    fn store_loss(&self, wtxn: &mut RwTxn<'_>, record: &LossRecord) -> Result<(), QueueError> {
        let meta = self.meta_table();
        let mut n = 0u32;
        loop {
            let key = format!("{LOSS_PREFIX}{:020}/{n:04}", record.at_unix_ms);
            if meta.get(wtxn, key.as_bytes())?.is_none() {
                return self.put_meta(wtxn, &key, record.encode().as_bytes());
            }
            n += 1;
        }
    }

    /// Every recorded repair, oldest first.
    pub fn losses(&self, txn: &heed::RoTxn<'_>) -> Result<Vec<LossRecord>, QueueError> {
        let mut out = Vec::new();
        for entry in self.meta_table().prefix_iter(txn, LOSS_PREFIX.as_bytes())? {
            let (key, stored) = entry?;
            if let Some(record) = unseal(key, stored).and_then(LossRecord::decode) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Forgets the recorded repairs (an operator acknowledged them); returns how many.
    pub fn clear_losses(&self) -> Result<usize, QueueError> {
        let mut wtxn = self.write()?;
        let keys: Vec<Vec<u8>> = self
            .meta_table()
            .prefix_iter(&wtxn, LOSS_PREFIX.as_bytes())?
            .map(|entry| entry.map(|(key, _)| key.to_vec()))
            .collect::<Result<_, _>>()?;
        for key in &keys {
            self.meta_table().delete(&mut wtxn, key)?;
        }
        self.commit(wtxn)?;
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QueueOptions;
    use crate::batch::{SpanBatch, SpanRecord};

    fn spans(tag: u8, count: usize) -> Vec<u8> {
        let spans = (0..count).map(|_| SpanRecord { body: vec![tag; 40], ..Default::default() }).collect();
        batch::encode_spans(&SpanBatch { received_unix_nano: 1, spans, ..Default::default() }).unwrap()
    }

    fn open(dir: &std::path::Path) -> Queue {
        Queue::open(dir, &QueueOptions { max_size_bytes: 16 << 20, ..QueueOptions::default() }).unwrap()
    }

    /// Flips one byte of a stored value in place (what a torn page or bit rot does).
    fn flip(q: &Queue, table: Table, key: &[u8], at: usize) {
        assert!(q.flip_in(table, key, at).unwrap(), "nothing stored to flip");
    }

    fn stored_seqs(q: &Queue, edge: Edge, after: u64) -> Vec<u64> {
        let txn = q.read().unwrap();
        q.entries_after(&txn, edge, after).unwrap().map(|entry| entry.unwrap().0).collect()
    }

    #[test]
    fn a_full_repair_quarantines_only_what_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let mut wtxn = q.write().unwrap();
        for tag in 1..=6 {
            q.append(&mut wtxn, Edge::Spans, &spans(tag, 3)).unwrap();
        }
        q.append(&mut wtxn, Edge::KeptSpans, &spans(9, 2)).unwrap();
        q.advance(&mut wtxn, Consumer::TailSample, 0, 2).unwrap();
        q.state_put(&mut wtxn, b"stage/x", b"hello").unwrap();
        q.set_meta_u64(&mut wtxn, "tail_sample/read_pos", 4).unwrap();
        q.commit(wtxn).unwrap();

        // A payload byte of batch 4 (rkyv still validates it; the checksum does not), the
        // cursor of export_traces, a stage position, a state value and the depth of `spans`.
        flip(&q, q.edge_tables()[Edge::Spans as usize], &seq_key(4), 40);
        let mut wtxn = q.write().unwrap();
        q.advance(&mut wtxn, Consumer::ExportTraces, 0, 0).unwrap();
        q.commit(wtxn).unwrap();
        let mut wtxn = q.write().unwrap();
        q.put_sealed(q.cursors_table(), &mut wtxn, b"export_traces", &seq_key(1)).unwrap();
        q.commit(wtxn).unwrap();
        flip(&q, q.cursors_table(), b"export_traces", 7);
        flip(&q, q.meta_table(), b"tail_sample/read_pos", 7);
        flip(&q, q.small_tables()[4], b"stage/x", 1);
        flip(&q, q.meta_table(), &depth_key(Edge::Spans), 20);

        let txn = q.read().unwrap();
        assert!(matches!(q.cursor(&txn, Consumer::ExportTraces), Err(QueueError::Damaged { table: "cursors", .. })));
        assert!(matches!(q.state_get(&txn, b"stage/x"), Err(QueueError::Damaged { table: "state", .. })));
        drop(txn);

        let report = q.repair().unwrap();
        assert_eq!(report.depth_corrected, Vec::<Edge>::new(), "a damaged depth is recomputed, not 'corrected'");
        let actions: Vec<(String, String)> =
            report.records.iter().map(|r| (r.table.clone(), r.action.clone())).collect();
        assert!(actions.contains(&("spans".into(), "quarantined".into())), "{actions:?}");
        assert!(actions.contains(&("cursors".into(), "reset".into())), "{actions:?}");
        assert!(actions.contains(&("meta".into(), "deleted".into())), "{actions:?}");
        assert!(actions.contains(&("state".into(), "deleted".into())), "{actions:?}");
        let batch = report.records.iter().find(|r| r.table == "spans").unwrap();
        assert_eq!((batch.first_seq, batch.items), (4, 3));

        // Every intact batch stays; the depth matches what is left; the cursor re-reads the edge.
        assert_eq!(stored_seqs(&q, Edge::Spans, 2), vec![3, 5, 6]);
        let txn = q.read().unwrap();
        let depth = q.depth(&txn, Edge::Spans).unwrap();
        assert_eq!((depth.next_seq, depth.batches, depth.items), (7, 3, 9));
        assert_eq!(q.cursor(&txn, Consumer::ExportTraces).unwrap(), 0);
        assert_eq!(q.meta_u64(&txn, "tail_sample/read_pos").unwrap(), None);
        assert_eq!(q.state_get(&txn, b"stage/x").unwrap(), None);
        assert_eq!(q.losses(&txn).unwrap().len(), report.records.len());
        drop(txn);

        // A second pass finds nothing; appends continue after the highest number ever used.
        assert!(q.repair().unwrap().records.is_empty());
        let mut wtxn = q.write().unwrap();
        assert_eq!(q.append(&mut wtxn, Edge::Spans, &spans(7, 1)).unwrap(), 7);
        q.commit(wtxn).unwrap();
        assert_eq!(q.clear_losses().unwrap(), report.records.len());
    }

    #[test]
    fn the_writer_lock_owner_is_read_from_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        assert_eq!(q.writer_lock_owner(), None);
        assert!(q.writer_lock_layout_ok());
        // Held by another thread: that thread's id.
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = q.clone();
        let thread = std::thread::spawn(move || {
            let wtxn = holder.write().unwrap();
            tx.send(rustix::thread::gettid().as_raw_nonzero().get() as u32).unwrap();
            released.recv().unwrap();
            drop(wtxn);
        });
        let tid = rx.recv().unwrap();
        assert_eq!(q.writer_lock_owner(), Some(tid));
        release.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(q.writer_lock_owner(), None);
    }

    #[test]
    fn run_time_damage_is_repaired_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let mut wtxn = q.write().unwrap();
        for tag in 1..=3 {
            q.append(&mut wtxn, Edge::Spans, &spans(tag, 2)).unwrap();
        }
        q.commit(wtxn).unwrap();
        flip(&q, q.edge_tables()[Edge::Spans as usize], &seq_key(2), 30);
        let txn = q.read().unwrap();
        let value = q.get(&txn, Edge::Spans, 2).unwrap().unwrap();
        let err = batch::access_spans(value).map(|_| ()).map_err(QueueError::corrupt_at(Edge::Spans, 2)).unwrap_err();
        drop(txn);
        assert!(err.is_damage());
        let record = q.repair_damage(&err).unwrap().expect("repaired");
        assert_eq!((record.table.as_str(), record.first_seq, record.items), ("spans", 2, 2));
        assert_eq!(q.repair_damage(&err).unwrap(), None, "already repaired");
        assert_eq!(stored_seqs(&q, Edge::Spans, 0), vec![1, 3]);
        let txn = q.read().unwrap();
        assert_eq!(q.depth(&txn, Edge::Spans).unwrap().items, 4);
        drop(txn);
        // A damaged depth is recomputed from the edge.
        flip(&q, q.meta_table(), &depth_key(Edge::Spans), 3);
        let txn = q.read().unwrap();
        let err = q.depth(&txn, Edge::Spans).unwrap_err();
        drop(txn);
        let record = q.repair_damage(&err).unwrap().expect("repaired");
        assert_eq!(record.action, "recomputed");
        let txn = q.read().unwrap();
        assert_eq!(q.depth(&txn, Edge::Spans).unwrap().items, 4);
        drop(txn);
        // A refused append (seq 0) is not damage.
        let refused = QueueError::Corrupt { edge: Edge::Spans, seq: 0, source: batch::BatchError::Header("x") };
        assert!(!refused.is_damage());
    }

    #[test]
    fn loss_records_round_trip() {
        let record = LossRecord {
            at_unix_ms: 5,
            table: "spans".into(),
            first_seq: 7,
            last_seq: 7,
            entries: 1,
            items: 512,
            action: "quarantined".into(),
            reason: "batch checksum mismatch\twith a tab".into(),
        };
        let back = LossRecord::decode(record.encode().as_bytes()).unwrap();
        assert_eq!(back.reason, "batch checksum mismatch with a tab");
        assert_eq!(back.items, 512);
        assert_eq!(
            back.to_string(),
            "spans: quarantined 1 entry (seq 7), 512 items lost: batch checksum mismatch with a tab"
        );
    }
}
