//! The durable queue: one LMDB environment shared by every stage process.
//!
//! Layout (named databases in one environment under `<data_dir>/queue`):
//! - one table per [`Edge`]: `seq (u64 big-endian) -> batch` (header + rkyv archive), keys
//!   strictly increasing, written with `MDB_APPEND`;
//! - `cursors`: `consumer -> seq`, the last sequence number the consumer has fully handled;
//! - `meta`: per-edge [`EdgeDepth`] (next sequence number, batches, items, bytes pending) and
//!   stage positions (`tail_sample` read position);
//! - `decisions` and `decision_expiry`: the trace decisions tail_sample publishes (see
//!   [`crate::decisions`]);
//! - `state`: small per-stage durable state (spanmetrics series, export offsets).
//!
//! Every value of the small tables (`cursors`, `meta`, `state`, `decisions`, `decision_expiry`)
//! is sealed: stored with a CRC-32 of its key and value, checked on every read. Batches carry
//! their own checksum ([`crate::batch`]). A damaged value or batch is an error naming what is
//! damaged ([`QueueError::Damaged`], [`QueueError::Corrupt`]), which [`crate::repair`] turns
//! into the smallest repair that keeps everything intact.
//!
//! Invariants:
//! 1. A stage step (read input, write output, advance its cursor, delete consumed input) is one
//!    write transaction, so a process killed at any instant loses nothing and emits nothing twice.
//! 2. Sequence numbers of an edge never repeat, even after every entry was deleted: the next
//!    number lives in `meta`, not in the table's last key.
//! 3. An entry is deleted only when every consumer of its edge has its cursor at or past it.
//! 4. [`Queue::advance`] refuses to move a cursor that is not where the caller last saw it, so a
//!    second instance of a consumer can never double-apply a step.
//! 5. Commits do not fsync (`NO_SYNC`); [`Queue::force_sync`] runs on an interval (the supervisor
//!    calls it). A process crash loses nothing; a power loss loses at most that interval.
//!    `NO_SYNC` can leave a torn environment after an OS crash: the supervisor checks every batch
//!    after an unclean shutdown ([`Queue::verify`]) and readers use checked rkyv access, so a
//!    torn page is an error, not undefined behaviour. Writers do not use `WRITE_MAP`: through a
//!    writable shared map every page written after a sync takes a write-protect fault (the sync
//!    cleans and write-protects it), measured at ~11,000 faults a second in tail_sample at
//!    500k spans/s and a sync costing the supervisor 7.6% of a core; LMDB's own page buffers,
//!    written with `pwrite` at commit, cost a copy instead (13-20% less CPU for the pipeline,
//!    BENCHMARKS.md). The price: each process keeps the buffers of its largest transaction's
//!    dirty pages for reuse (LMDB's free list), so writers bound the pages one transaction
//!    dirties (tail_sample's decisions and prunes per step: `stages/src/limits.rs`).
//! 6. The budget is tiered so that no stage can starve the one that frees space: intake stops
//!    where a commit would take the map past [`INTAKE_STOP_RATIO`] (counting the size of what it
//!    adds); stages that read one edge and write another stop stepping above
//!    [`STAGE_STOP_RATIO`] and read at most [`Queue::max_step_bytes`] per step; export, which
//!    only deletes (moves cursors), is never held back, so it can always free space once its
//!    backend answers. At the limit every stage waits; none deadlocks.

use std::path::Path;

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RoTxn, RwTxn, WithoutTls};

use crate::batch::{self, BatchError, BatchHeader};
use crate::topology::{Consumer, Edge};

/// Byte offset of the writer mutex in `lock.mdb` (LMDB's `MDB_txninfo.mt2`, one cache line in).
const WRITER_MUTEX_OFFSET: u64 = 64;

/// The owner TID bits of a robust futex word (below `FUTEX_OWNER_DIED` and `FUTEX_WAITERS`).
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// Fraction of the map above which [`Queue::admits`] answers false and receive pushes back.
pub const INTAKE_STOP_RATIO: f64 = 0.8;

/// Fraction of the map above which stages that write output (tail_sample, log_mirror,
/// spanmetrics) stop stepping, leaving the rest for export's cursor moves.
pub const STAGE_STOP_RATIO: f64 = 0.9;

/// Pages a commit needs besides its values (B-tree branches, copied leaves, meta), as a factor
/// of the value bytes it adds.
const COMMIT_OVERHEAD: f64 = 1.5;

pub(crate) type Table = Database<'static, Bytes, Bytes>;

/// Key/value pairs borrowed from the map for the life of a transaction.
pub type Entries<'t> = Vec<(&'t [u8], &'t [u8])>;

/// A read transaction usable across `.await` (no thread-local reader slot).
pub type ReadTxn<'e> = RoTxn<'e, WithoutTls>;

/// A write transaction (holds the environment's single writer lock until commit or drop).
pub type WriteTxn<'e> = RwTxn<'e>;

/// How to open the queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Map size: the disk budget of the queue, in bytes.
    pub max_size_bytes: u64,
    /// Reader slots; every stage process uses a few.
    pub max_readers: u32,
    /// Consumers whose destination is not configured: their cursors do not hold entries back.
    /// Every process of one deployment must open the queue with the same list.
    pub inactive_consumers: Vec<Consumer>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions { max_size_bytes: 1 << 30, max_readers: 126, inactive_consumers: Vec::new() }
    }
}

/// Opening the environment failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueOpenError {
    /// The directory could not be created.
    #[error("cannot create queue directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// LMDB refused to open or create the environment or its tables.
    #[error("cannot open LMDB environment at {path}: {source}")]
    Lmdb {
        /// The directory.
        path: String,
        /// Why.
        source: heed::Error,
    },
}

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The map is full: the disk budget is reached. Retry after consumers freed space.
    #[error("queue is full (disk budget reached)")]
    Full,
    /// A cursor was not where the caller expected: another instance moved it.
    #[error("cursor of {consumer} is at {found}, expected {expected}")]
    CursorMoved {
        /// Whose cursor.
        consumer: &'static str,
        /// What the caller saw.
        expected: u64,
        /// What is stored.
        found: u64,
    },
    /// A stored value is not a valid batch (`seq` 0: a value refused before it was stored).
    #[error("corrupt entry {seq} in edge {name}: {source}", name = .edge.as_str())]
    Corrupt {
        /// The edge.
        edge: Edge,
        /// Sequence number.
        seq: u64,
        /// What is wrong.
        source: BatchError,
    },
    /// A value of a small table failed its checksum or has the wrong shape.
    #[error("damaged value in table {table} under key {}", String::from_utf8_lossy(.key))]
    Damaged {
        /// The table (`cursors`, `meta`, `state`, `decisions`, `decision_expiry`).
        table: &'static str,
        /// The key whose value is damaged.
        key: Vec<u8>,
    },
    /// Any other LMDB error.
    #[error("lmdb: {0}")]
    Lmdb(heed::Error),
}

impl QueueError {
    /// Maps a batch that failed its checks to [`QueueError::Corrupt`] at `edge`/`seq`.
    pub fn corrupt_at(edge: Edge, seq: u64) -> impl FnOnce(BatchError) -> QueueError {
        move |source| QueueError::Corrupt { edge, seq, source }
    }

    /// Whether this error names stored damage that [`Queue::repair_damage`] can repair.
    pub fn is_damage(&self) -> bool {
        matches!(self, QueueError::Corrupt { seq: 1.., .. } | QueueError::Damaged { .. })
    }
}

/// Names of the small (sealed) tables, in the order [`all_tables`] opens them.
pub(crate) const SMALL_TABLES: [&str; 5] = ["cursors", "meta", "decisions", "decision_expiry", "state"];

/// Format of the queue's values: 3 = sealed small tables and checksummed batches.
pub const QUEUE_FORMAT: u64 = 3;
pub(crate) const FORMAT_KEY: &str = "queue/format";

/// Stores `value` followed by the CRC-32 of `key` and `value`.
pub(crate) fn seal(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 4);
    out.extend_from_slice(value);
    out.extend_from_slice(&seal_crc(key, value).to_le_bytes());
    out
}

fn seal_crc(key: &[u8], value: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(value);
    hasher.finalize()
}

/// The value inside a sealed entry, or `None` when its checksum does not match.
pub(crate) fn unseal<'v>(key: &[u8], stored: &'v [u8]) -> Option<&'v [u8]> {
    let split = stored.len().checked_sub(4)?;
    let (value, crc) = stored.split_at(split);
    (u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) == seal_crc(key, value)).then_some(value)
}

fn u64_of(raw: &[u8]) -> Option<u64> {
    raw.try_into().ok().map(u64::from_be_bytes)
}

impl From<heed::Error> for QueueError {
    fn from(err: heed::Error) -> Self {
        match err {
            heed::Error::Mdb(heed::MdbError::MapFull) => QueueError::Full,
            other => QueueError::Lmdb(other),
        }
    }
}

/// What an edge holds: the true backlog of its slowest consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeDepth {
    /// The sequence number the next appended batch gets (starts at 1).
    pub next_seq: u64,
    /// Batches stored.
    pub batches: u64,
    /// Items (spans, records, data points) stored.
    pub items: u64,
    /// Bytes of stored values.
    pub bytes: u64,
}

impl EdgeDepth {
    fn decode(value: &[u8]) -> Option<EdgeDepth> {
        if value.len() != 32 {
            return None;
        }
        let word = |i: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&value[i * 8..i * 8 + 8]);
            u64::from_be_bytes(raw)
        };
        Some(EdgeDepth { next_seq: word(0), batches: word(1), items: word(2), bytes: word(3) })
    }

    fn empty() -> EdgeDepth {
        EdgeDepth { next_seq: 1, ..EdgeDepth::default() }
    }

    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, word) in [self.next_seq, self.batches, self.items, self.bytes].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

/// Result of [`Queue::verify`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Entries that failed validation, as (edge, seq).
    pub corrupt: Vec<(&'static str, u64)>,
}

/// Handle on the shared environment. Cheap to clone; clone it rather than opening twice.
#[derive(Clone)]
pub struct Queue {
    env: Env<WithoutTls>,
    edges: [Table; Edge::ALL.len()],
    cursors: Table,
    meta: Table,
    pub(crate) decisions: Table,
    pub(crate) decision_expiry: Table,
    state: Table,
    /// Per consumer (indexed by `Consumer as usize`): whether its cursor holds entries back.
    active: [bool; Consumer::ALL.len()],
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.env.path()).finish()
    }
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn key_seq(key: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let len = key.len().min(8);
    raw[8 - len..].copy_from_slice(&key[..len]);
    u64::from_be_bytes(raw)
}

/// Every table, opened or created by `table`: the edges (in [`Edge`] order), then `cursors`,
/// `meta`, `decisions`, `decision_expiry` and `state`.
fn all_tables<T>(
    mut table: impl FnMut(&str) -> Result<T, heed::Error>,
) -> Result<([T; Edge::ALL.len()], [T; 5]), heed::Error> {
    let edges = [
        table(Edge::Spans.as_str())?,
        table(Edge::KeptSpans.as_str())?,
        table(Edge::Logs.as_str())?,
        table(Edge::KeptLogs.as_str())?,
        table(Edge::Metrics.as_str())?,
        table(Edge::SpanSummaries.as_str())?,
    ];
    let named = [table("cursors")?, table("meta")?, table("decisions")?, table("decision_expiry")?, table("state")?];
    Ok((edges, named))
}

pub(crate) fn depth_key(edge: Edge) -> Vec<u8> {
    format!("depth/{}", edge.as_str()).into_bytes()
}

impl Queue {
    /// Opens (or creates) the environment under `dir` with every table.
    pub fn open(dir: &Path, options: &QueueOptions) -> Result<Queue, QueueOpenError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| QueueOpenError::CreateDir { path: dir.display().to_string(), source })?;
        let lmdb = |source| QueueOpenError::Lmdb { path: dir.display().to_string(), source };
        let mut builder = EnvOpenOptions::new().read_txn_without_tls();
        builder
            .map_size(usize::try_from(options.max_size_bytes).unwrap_or(usize::MAX))
            .max_dbs(16)
            .max_readers(options.max_readers);
        // SAFETY: NO_SYNC is sound for process crashes (a killed writer's
        // transaction is never visible); the OS-crash risk they carry is handled by the
        // unclean-shutdown verification (invariant 5). NO_READ_AHEAD keeps page cache use to
        // what is read. Each process opens the environment once and clones the handle.
        let env = unsafe {
            builder.flags(EnvFlags::NO_SYNC | EnvFlags::NO_READ_AHEAD);
            builder.open(dir)
        }
        .map_err(lmdb)?;
        // Reader slots of processes that died (SIGKILL) pin pages until cleared.
        env.clear_stale_readers().map_err(lmdb)?;
        let wtxn = env.write_txn().map_err(lmdb)?;
        let tables = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                let tables = all_tables(|name| opener.create_database::<Bytes, Bytes>(wtxn, Some(name)))?;
                Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(tables))
            })
            .map_err(lmdb)?
            .unwrap_commit();
        let queue = Queue::assemble(env, tables, options);
        queue.migrate().map_err(|err| match err {
            QueueError::Lmdb(source) => lmdb(source),
            other => lmdb(heed::Error::Io(std::io::Error::other(other.to_string()))),
        })?;
        Ok(queue)
    }

    /// Seals the small tables of an environment written before values were sealed (format 2),
    /// once, by whichever process opens it first.
    fn migrate(&self) -> Result<(), QueueError> {
        {
            let rtxn = self.read()?;
            if self.meta.get(&rtxn, FORMAT_KEY.as_bytes())?.is_some() {
                return Ok(());
            }
        }
        let mut wtxn = self.write()?;
        if self.meta.get(&wtxn, FORMAT_KEY.as_bytes())?.is_some() {
            return Ok(());
        }
        for table in self.small_tables() {
            let mut rewritten = Vec::new();
            for entry in table.iter(&wtxn)? {
                let (key, value) = entry?;
                rewritten.push((key.to_vec(), seal(key, value)));
            }
            for (key, value) in rewritten {
                table.put(&mut wtxn, &key, &value)?;
            }
        }
        self.set_meta_u64(&mut wtxn, FORMAT_KEY, QUEUE_FORMAT)?;
        self.commit(wtxn)
    }

    /// The small tables with their names ([`SMALL_TABLES`] order).
    pub(crate) fn small_tables(&self) -> [Table; 5] {
        [self.cursors, self.meta, self.decisions, self.decision_expiry, self.state]
    }

    pub(crate) fn edge_tables(&self) -> &[Table; Edge::ALL.len()] {
        &self.edges
    }

    /// Reads a sealed value of a small table.
    pub(crate) fn get_sealed<'t>(
        &self,
        table: Table,
        name: &'static str,
        txn: &'t RoTxn<'_>,
        key: &[u8],
    ) -> Result<Option<&'t [u8]>, QueueError> {
        match table.get(txn, key)? {
            None => Ok(None),
            Some(stored) => {
                unseal(key, stored).map(Some).ok_or_else(|| QueueError::Damaged { table: name, key: key.to_vec() })
            }
        }
    }

    /// Writes a sealed value of a small table.
    pub(crate) fn put_sealed(
        &self,
        table: Table,
        wtxn: &mut RwTxn<'_>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), QueueError> {
        Ok(table.put(wtxn, key, &seal(key, value))?)
    }

    /// Like [`Queue::put_sealed`] for a key expected to sort after every key in `table` (a
    /// time-ordered index): appended to the last page without a search of the tree; a key that
    /// does not sort last is put in place.
    pub(crate) fn put_sealed_last(
        &self,
        table: Table,
        wtxn: &mut RwTxn<'_>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), QueueError> {
        let sealed = seal(key, value);
        match table.put_with_flags(wtxn, PutFlags::APPEND, key, &sealed) {
            Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => Ok(table.put(wtxn, key, &sealed)?),
            other => Ok(other?),
        }
    }

    /// Reads a sealed u64 (wrong length is damage too).
    fn get_sealed_u64(
        &self,
        table: Table,
        name: &'static str,
        txn: &RoTxn<'_>,
        key: &[u8],
    ) -> Result<Option<u64>, QueueError> {
        match self.get_sealed(table, name, txn, key)? {
            None => Ok(None),
            Some(raw) => u64_of(raw).map(Some).ok_or_else(|| QueueError::Damaged { table: name, key: key.to_vec() }),
        }
    }

    pub(crate) fn cursors_table(&self) -> Table {
        self.cursors
    }

    pub(crate) fn meta_table(&self) -> Table {
        self.meta
    }

    fn assemble(env: Env<WithoutTls>, tables: ([Table; Edge::ALL.len()], [Table; 5]), options: &QueueOptions) -> Queue {
        let (edges, [cursors, meta, decisions, decision_expiry, state]) = tables;
        let mut active = [true; Consumer::ALL.len()];
        for consumer in &options.inactive_consumers {
            active[*consumer as usize] = false;
        }
        Queue { env, edges, cursors, meta, decisions, decision_expiry, state, active }
    }

    /// Opens an existing environment for reading only (`tailgate status`): no write transaction
    /// (so it never waits behind a stuck writer), the map size the environment was created with
    /// (the file is never grown), no stale-reader cleanup. Fails if the queue was never created.
    pub fn open_read_only(dir: &Path, options: &QueueOptions) -> Result<Queue, QueueOpenError> {
        let lmdb = |source| QueueOpenError::Lmdb { path: dir.display().to_string(), source };
        let mut builder = EnvOpenOptions::new().read_txn_without_tls();
        builder.max_dbs(16).max_readers(options.max_readers);
        // SAFETY: READ_ONLY opens the existing map without writing to it; without a map size
        // LMDB uses the one stored in the environment. The handle lives as long as the caller.
        let env = unsafe {
            builder.flags(EnvFlags::READ_ONLY | EnvFlags::NO_READ_AHEAD);
            builder.open(dir)
        }
        .map_err(lmdb)?;
        let rtxn = env.read_txn().map_err(lmdb)?;
        let tables = env
            .open_databases_and_commit(rtxn, |opener, rtxn| {
                let tables = all_tables(|name| {
                    opener
                        .open_database::<Bytes, Bytes>(rtxn, Some(name))?
                        .ok_or(heed::Error::Mdb(heed::MdbError::NotFound))
                })?;
                Ok::<_, heed::Error>(heed::CommitOrAbort::<_, ()>::Commit(tables))
            })
            .map_err(lmdb)?
            .unwrap_commit();
        Ok(Queue::assemble(env, tables, options))
    }

    /// Starts a read transaction (a consistent snapshot; values borrowed from it are zero-copy).
    pub fn read(&self) -> Result<ReadTxn<'_>, QueueError> {
        Ok(self.env.read_txn()?)
    }

    /// Starts a write transaction (takes the environment's single writer lock).
    pub fn write(&self) -> Result<RwTxn<'_>, QueueError> {
        Ok(self.env.write_txn()?)
    }

    /// Commits a write transaction, mapping a full map to [`QueueError::Full`].
    pub fn commit(&self, wtxn: RwTxn<'_>) -> Result<(), QueueError> {
        Ok(wtxn.commit()?)
    }

    fn edge_table(&self, edge: Edge) -> Table {
        self.edges[edge as usize]
    }

    /// The consumer's cursor: the last sequence number it has fully handled (0: none).
    pub fn cursor(&self, txn: &RoTxn<'_>, consumer: Consumer) -> Result<u64, QueueError> {
        Ok(self.get_sealed_u64(self.cursors, "cursors", txn, consumer.as_str().as_bytes())?.unwrap_or(0))
    }

    /// Entries of `edge` with a sequence number above `after`, in order, borrowed from the map.
    pub fn entries_after<'t>(
        &self,
        txn: &'t RoTxn<'_>,
        edge: Edge,
        after: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, &'t [u8]), QueueError>> + 't, QueueError> {
        let start = seq_key(after.saturating_add(1));
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Unbounded);
        let iter = self.edge_table(edge).range(txn, &range)?;
        Ok(iter.map(|item| item.map(|(key, value)| (key_seq(key), value)).map_err(QueueError::from)))
    }

    /// One entry of `edge`, borrowed from the map.
    pub fn get<'t>(&self, txn: &'t RoTxn<'_>, edge: Edge, seq: u64) -> Result<Option<&'t [u8]>, QueueError> {
        Ok(self.edge_table(edge).get(txn, &seq_key(seq))?)
    }

    /// What `edge` holds now.
    pub fn depth(&self, txn: &RoTxn<'_>, edge: Edge) -> Result<EdgeDepth, QueueError> {
        let key = depth_key(edge);
        match self.get_sealed(self.meta, "meta", txn, &key)? {
            None => Ok(EdgeDepth::empty()),
            Some(raw) => EdgeDepth::decode(raw).ok_or(QueueError::Damaged { table: "meta", key }),
        }
    }

    /// The edge's depth; if its record is damaged (a torn `meta` page), recounted from the
    /// batches' headers, so appends and deletes keep working and the next write stores it whole.
    pub(crate) fn depth_or_recount(&self, txn: &RoTxn<'_>, edge: Edge) -> Result<EdgeDepth, QueueError> {
        match self.depth(txn, edge) {
            Err(QueueError::Damaged { .. }) => {
                tracing::warn!(edge = edge.as_str(), "depth record damaged; recounting the edge");
                let mut depth = EdgeDepth::empty();
                for entry in self.edge_table(edge).iter(txn)? {
                    let (key, value) = entry?;
                    depth.next_seq = depth.next_seq.max(key_seq(key) + 1);
                    depth.batches += 1;
                    depth.items += BatchHeader::parse(value).map(|h| u64::from(h.items)).unwrap_or(0);
                    depth.bytes += value.len() as u64;
                }
                Ok(depth)
            }
            other => other,
        }
    }

    pub(crate) fn put_depth(&self, wtxn: &mut RwTxn<'_>, edge: Edge, depth: &EdgeDepth) -> Result<(), QueueError> {
        self.put_sealed(self.meta, wtxn, &depth_key(edge), &depth.encode())
    }

    /// Appends a batch (as produced by [`crate::batch`]) to `edge`; returns its sequence number.
    pub fn append(&self, wtxn: &mut RwTxn<'_>, edge: Edge, value: &[u8]) -> Result<u64, QueueError> {
        let header = BatchHeader::parse(value).map_err(|source| QueueError::Corrupt { edge, seq: 0, source })?;
        let mut depth = self.depth_or_recount(wtxn, edge)?;
        // `next_seq` lives in `meta`; should it be stale (a torn page after an OS crash), the
        // table's last key and the consumers' cursors still keep appends strictly increasing and
        // above what was consumed, instead of failing for ever or hiding behind a cursor.
        let mut last_used = self.edge_table(edge).last(wtxn)?.map(|(key, _)| key_seq(key)).unwrap_or(0);
        for consumer in edge.consumers() {
            last_used = last_used.max(self.cursor(wtxn, *consumer)?);
        }
        let seq = depth.next_seq.max(last_used + 1);
        self.edge_table(edge).put_with_flags(wtxn, PutFlags::APPEND, &seq_key(seq), value)?;
        depth.next_seq = seq + 1;
        depth.batches += 1;
        depth.items += u64::from(header.items);
        depth.bytes += value.len() as u64;
        self.put_depth(wtxn, edge, &depth)?;
        Ok(seq)
    }

    /// Moves `consumer`'s cursor from `expected` to `to` and deletes the entries every consumer of
    /// the edge is past. Fails with [`QueueError::CursorMoved`] if the cursor is not at `expected`.
    pub fn advance(&self, wtxn: &mut RwTxn<'_>, consumer: Consumer, expected: u64, to: u64) -> Result<(), QueueError> {
        let found = self.cursor(wtxn, consumer)?;
        if found != expected {
            return Err(QueueError::CursorMoved { consumer: consumer.as_str(), expected, found });
        }
        if to == found {
            return Ok(());
        }
        self.put_sealed(self.cursors, wtxn, consumer.as_str().as_bytes(), &seq_key(to))?;
        let edge = consumer.edge();
        let mut lowest = to;
        for other in self.active_consumers(edge) {
            lowest = lowest.min(self.cursor(wtxn, other)?);
        }
        self.delete_through(wtxn, edge, lowest)
    }

    /// The consumers of `edge` whose cursors hold its entries back.
    pub fn active_consumers(&self, edge: Edge) -> impl Iterator<Item = Consumer> + '_ {
        edge.consumers().iter().copied().filter(|consumer| self.active[*consumer as usize])
    }

    /// Whether `consumer`'s cursor holds entries back (its destination is configured).
    pub fn is_active(&self, consumer: Consumer) -> bool {
        self.active[consumer as usize]
    }

    pub(crate) fn delete_through(&self, wtxn: &mut RwTxn<'_>, edge: Edge, last: u64) -> Result<(), QueueError> {
        let table = self.edge_table(edge);
        let end = seq_key(last);
        let range = (std::ops::Bound::Unbounded, std::ops::Bound::Included(&end[..]));
        let (mut batches, mut items, mut bytes) = (0u64, 0u64, 0u64);
        for entry in table.range(wtxn, &range)? {
            let (_, value) = entry?;
            batches += 1;
            // A value that lost its header still has to go; count it as zero items.
            items += BatchHeader::parse(value).map(|h| u64::from(h.items)).unwrap_or(0);
            bytes += value.len() as u64;
        }
        if batches == 0 {
            return Ok(());
        }
        table.delete_range(wtxn, &range)?;
        let mut depth = self.depth_or_recount(wtxn, edge)?;
        depth.batches = depth.batches.saturating_sub(batches);
        depth.items = depth.items.saturating_sub(items);
        depth.bytes = depth.bytes.saturating_sub(bytes);
        self.put_depth(wtxn, edge, &depth)
    }

    /// How old the oldest stored batch of `edge` is at `now_unix_nano` (it was accepted or
    /// produced then), in seconds; `None` when the edge is empty.
    pub fn oldest_age_seconds(
        &self,
        txn: &RoTxn<'_>,
        edge: Edge,
        now_unix_nano: u64,
    ) -> Result<Option<f64>, QueueError> {
        Ok(self
            .entries_after(txn, edge, 0)?
            .next()
            .and_then(|entry| entry.ok())
            .and_then(|(_, value)| crate::batch::received_unix_nano(value))
            .map(|at| now_unix_nano.saturating_sub(at) as f64 / 1e9))
    }

    /// Bytes of pages in use by all tables (free pages excluded).
    pub fn used_bytes(&self, txn: &RoTxn<'_>) -> Result<u64, QueueError> {
        let mut pages = 0u64;
        let mut page_size = 4096u64;
        let tables =
            self.edges.iter().chain([&self.cursors, &self.meta, &self.decisions, &self.decision_expiry, &self.state]);
        for table in tables {
            let stat = table.stat(txn)?;
            page_size = u64::from(stat.page_size);
            pages += (stat.branch_pages + stat.leaf_pages + stat.overflow_pages) as u64;
        }
        Ok(pages * page_size)
    }

    /// The thread id (TID) holding the environment's writer lock, read from `lock.mdb`, or
    /// `None` when it is free. LMDB on Linux uses a process-shared robust pthread mutex at byte
    /// 64 of the lock file, and a robust mutex's futex word holds its owner's TID (with the
    /// waiters and owner-died bits above it). The layout is LMDB's build choice, not an API: a
    /// caller verifies it once by taking the lock itself ([`Queue::writer_lock_layout_ok`]).
    pub fn writer_lock_owner(&self) -> Option<u32> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(self.env.path().join("lock.mdb")).ok()?;
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, WRITER_MUTEX_OFFSET).ok()?;
        let tid = u32::from_ne_bytes(word) & FUTEX_TID_MASK;
        (tid != 0).then_some(tid)
    }

    /// Whether [`Queue::writer_lock_owner`] reads this LMDB build right: takes the writer lock
    /// on the calling thread and checks that the owner read is this thread.
    pub fn writer_lock_layout_ok(&self) -> bool {
        let Ok(wtxn) = self.write() else { return false };
        let owner = self.writer_lock_owner();
        drop(wtxn);
        let free = self.writer_lock_owner();
        owner == Some(rustix::thread::gettid().as_raw_nonzero().get() as u32) && free.is_none()
    }

    /// The environment's directory (`<data_dir>/queue`).
    pub fn path(&self) -> &Path {
        self.env.path()
    }

    /// The map size: the disk budget.
    pub fn capacity_bytes(&self) -> u64 {
        self.env.info().map_size as u64
    }

    /// Whether intake may add data now (false above [`INTAKE_STOP_RATIO`] of the budget).
    pub fn admits(&self, txn: &RoTxn<'_>) -> Result<bool, QueueError> {
        self.admits_bytes(txn, 0)
    }

    /// Whether intake may commit `incoming` more bytes of values: the map must stay below
    /// [`INTAKE_STOP_RATIO`] after the commit, counting its B-tree overhead.
    pub fn admits_bytes(&self, txn: &RoTxn<'_>, incoming: u64) -> Result<bool, QueueError> {
        let after = self.used_bytes(txn)? as f64 + incoming as f64 * COMMIT_OVERHEAD;
        Ok(after < self.capacity_bytes() as f64 * INTAKE_STOP_RATIO)
    }

    /// Whether a stage that writes output may take a step (false above [`STAGE_STOP_RATIO`]).
    pub fn stage_may_write(&self, txn: &RoTxn<'_>) -> Result<bool, QueueError> {
        Ok((self.used_bytes(txn)? as f64) < self.capacity_bytes() as f64 * STAGE_STOP_RATIO)
    }

    /// Whether a write step of about `bytes` finds room without depending on contiguous runs of
    /// free pages: twice that much of the map lies past its high-water mark (pages never used
    /// yet), or at most half the map is in use (free runs are then long). LMDB stores a value
    /// larger than a page in consecutive pages; near the budget the free ones are scattered.
    pub fn has_room_for_step(&self, txn: &RoTxn<'_>, bytes: u64) -> Result<bool, QueueError> {
        let info = self.env.info();
        let page_size = u64::from(self.cursors.stat(txn)?.page_size);
        let capacity = info.map_size as u64;
        let never_used = capacity.saturating_sub((info.last_page_number as u64 + 1) * page_size);
        Ok(never_used >= bytes.saturating_mul(2) || self.used_bytes(txn)?.saturating_mul(2) <= capacity)
    }

    /// Most input bytes a stage step reads (its output is at most about as large), so that one
    /// step cannot cross the headroom between [`STAGE_STOP_RATIO`] and the end of the map.
    pub fn max_step_bytes(&self) -> usize {
        usize::try_from(self.capacity_bytes() / 32).unwrap_or(usize::MAX)
    }

    /// Reads a value of the `meta` table (stage positions).
    pub fn meta_u64(&self, txn: &RoTxn<'_>, key: &str) -> Result<Option<u64>, QueueError> {
        self.get_sealed_u64(self.meta, "meta", txn, key.as_bytes())
    }

    /// Writes a value of the `meta` table.
    pub fn set_meta_u64(&self, wtxn: &mut RwTxn<'_>, key: &str, value: u64) -> Result<(), QueueError> {
        self.put_sealed(self.meta, wtxn, key.as_bytes(), &seq_key(value))
    }

    pub(crate) fn put_meta(&self, wtxn: &mut RwTxn<'_>, key: &str, value: &[u8]) -> Result<(), QueueError> {
        self.put_sealed(self.meta, wtxn, key.as_bytes(), value)
    }

    pub(crate) fn get_meta<'t>(&self, txn: &'t RoTxn<'_>, key: &str) -> Result<Option<&'t [u8]>, QueueError> {
        self.get_sealed(self.meta, "meta", txn, key.as_bytes())
    }

    /// A stage's durable private value.
    pub fn state_get<'t>(&self, txn: &'t RoTxn<'_>, key: &[u8]) -> Result<Option<&'t [u8]>, QueueError> {
        self.get_sealed(self.state, "state", txn, key)
    }

    /// Stores a stage's durable private value.
    pub fn state_put(&self, wtxn: &mut RwTxn<'_>, key: &[u8], value: &[u8]) -> Result<(), QueueError> {
        self.put_sealed(self.state, wtxn, key, value)
    }

    /// Deletes a stage's durable private value (absent is fine).
    pub fn state_delete(&self, wtxn: &mut RwTxn<'_>, key: &[u8]) -> Result<(), QueueError> {
        self.state.delete(wtxn, key)?;
        Ok(())
    }

    /// All state entries whose key starts with `prefix`.
    pub fn state_prefix<'t>(&self, txn: &'t RoTxn<'_>, prefix: &[u8]) -> Result<Entries<'t>, QueueError> {
        let mut out = Vec::new();
        for entry in self.state.prefix_iter(txn, prefix)? {
            let (key, stored) = entry?;
            let value = unseal(key, stored).ok_or_else(|| QueueError::Damaged { table: "state", key: key.to_vec() })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Flushes committed data to disk (the periodic fsync).
    pub fn force_sync(&self) -> Result<(), QueueError> {
        Ok(self.env.force_sync()?)
    }

    /// Frees reader slots left by dead processes; returns how many were cleared.
    pub fn clear_stale_readers(&self) -> Result<usize, QueueError> {
        Ok(self.env.clear_stale_readers()?)
    }

    /// Id of the last committed transaction (changes whenever anything was written).
    pub fn last_txn_id(&self) -> u64 {
        self.env.info().last_txn_id as u64
    }

    /// Checks every stored batch with checked rkyv access (after an unclean shutdown).
    pub fn verify(&self) -> Result<VerifyReport, QueueError> {
        let txn = self.read()?;
        let mut report = VerifyReport::default();
        for edge in Edge::ALL {
            for entry in self.edge_table(edge).iter(&txn)? {
                let (key, value) = entry?;
                report.entries += 1;
                if batch::verify(value).is_err() {
                    report.corrupt.push((edge.as_str(), key_seq(key)));
                }
            }
        }
        Ok(report)
    }
}
