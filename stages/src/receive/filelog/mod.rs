//! The file input (`receivers.filelog`): tails JSON log files into the `logs` edge.
//!
//! It runs in the receive process (inputs live there; the queue's intake and push-back are
//! shared) on a thread of its own, because reading a large file blocks and must not stall the
//! OTLP servers on receive's single runtime thread. Each poll (`poll_interval`) finds the files
//! `include` matches, reads what was appended ([`files`]), parses each line ([`fields`]), and
//! commits the records, every file's new checkpoint and the drift counts ([`drift`]) in one
//! write transaction: a SIGKILL at any instant neither loses nor repeats a line. When the queue
//! is at its budget nothing is read: the files themselves hold the backlog until it drains.

pub mod drift;
pub mod fields;
pub mod files;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tailgate_config::{FilelogReceiver, StartAt};
use tailgate_ipc::batch::{self, LogBatch, LogEntry, ResourceBlock, ScopeBlock};
use tailgate_ipc::heartbeat::Heartbeat;
use tailgate_ipc::wake::Waker;
use tailgate_ipc::{Edge, Queue, QueueError};
use tokio::sync::watch;

use crate::context::StageError;
use crate::events::StageEvents;
use crate::limits::MAX_OUTPUT_BATCH_BYTES;
use drift::{DRIFT_PREFIX, Drift, DriftTable};
use fields::LineParser;
use files::{CHECKPOINT_PREFIX, Checkpoint, FileId, INITIALIZED_KEY, ReadLimits, Tracked};
use tailgate_ipc::clock::{pipeline_now, wall_now};

/// The tailer's state between polls.
pub struct Tailer {
    config: FilelogReceiver,
    queue: Queue,
    waker: Arc<Waker>,
    events: Arc<StageEvents>,
    parser: LineParser,
    exclude: Vec<glob::Pattern>,
    tracked: HashMap<FileId, Tracked>,
    /// Checkpoints of files not opened yet (from the queue at start).
    stored: HashMap<FileId, Checkpoint>,
    /// Checkpoints of files no longer tailed, to delete.
    forgotten: Vec<FileId>,
    drift: DriftTable,
    /// Whether the receiver ran before (then `start_at` no longer applies).
    initialized: bool,
    /// Paths already reported as unreadable.
    unreadable: HashSet<String>,
    /// Whether a full queue was already reported.
    full_reported: bool,
    /// The bytes of the current read, reused across reads (see [`READ_BUFFER_KEEP`]).
    read_buffer: Vec<u8>,
}

/// The read buffer kept between polls: a poll that caught up shrinks it back to this, so a
/// backlog's 1 MiB reads do not stay in memory while a steady tail reads a few hundred KiB.
const READ_BUFFER_KEEP: usize = 256 * 1024;

impl std::fmt::Debug for Tailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tailer").field("files", &self.tracked.len()).finish_non_exhaustive()
    }
}

/// What one poll read, to be committed together.
#[derive(Default)]
struct PollOutput {
    logs: Vec<LogEntry>,
    /// service name -> scope index (one resource and scope per service).
    services: BTreeMap<String, u32>,
    bytes: usize,
    /// (file, new checkpoint) to apply after the commit.
    moved: Vec<(FileId, u64, bool)>,
    /// Drift of this poll's lines, per origin path.
    drift: HashMap<String, Drift>,
    /// Whether a file had more to read than one poll takes.
    more: bool,
}

impl Tailer {
    /// Loads checkpoints and drift counts from the queue.
    pub fn open(
        config: FilelogReceiver,
        queue: Queue,
        waker: Arc<Waker>,
        events: Arc<StageEvents>,
    ) -> Result<Tailer, StageError> {
        let rtxn = queue.read()?;
        let stored = queue
            .state_prefix(&rtxn, CHECKPOINT_PREFIX)?
            .into_iter()
            .filter_map(|(key, value)| Some((files::checkpoint_id(key)?, Checkpoint::decode(value)?)))
            .collect();
        let drift = DriftTable::load(queue.state_prefix(&rtxn, DRIFT_PREFIX)?.into_iter());
        let initialized = queue.state_get(&rtxn, INITIALIZED_KEY)?.is_some();
        drop(rtxn);
        let exclude = config.exclude.iter().filter_map(|pattern| glob::Pattern::new(pattern).ok()).collect();
        Ok(Tailer {
            parser: LineParser::new(&config),
            config,
            queue,
            waker,
            events,
            exclude,
            tracked: HashMap::new(),
            stored,
            forgotten: Vec::new(),
            drift,
            initialized,
            unreadable: HashSet::new(),
            full_reported: false,
            read_buffer: Vec::new(),
        })
    }

    /// Tails until `shutdown` flips (checked between polls); reads nothing while the supervisor
    /// pauses intake in `slot` (a drain: lines wait in their files).
    pub fn run(mut self, shutdown: watch::Receiver<bool>, slot: &Heartbeat) -> Result<(), StageError> {
        tracing::info!(include = ?self.config.include, resumed = self.stored.len(), "filelog receiver tailing");
        while !*shutdown.borrow() {
            if slot.intake_paused() {
                std::thread::park_timeout(self.config.poll_interval);
                continue;
            }
            let more = self.poll()?;
            if !more {
                std::thread::park_timeout(self.config.poll_interval);
            }
        }
        Ok(())
    }

    /// One poll: discover, read, commit. Returns whether more is waiting right away.
    pub fn poll(&mut self) -> Result<bool, StageError> {
        if !self.admits()? {
            if !self.full_reported {
                tracing::warn!("queue is at its disk budget; files wait on disk until it drains");
                self.full_reported = true;
            }
            self.events.error("queue_full");
            return Ok(false);
        }
        self.full_reported = false;
        self.discover();
        let output = self.read_files();
        let nothing_new = output.logs.is_empty()
            && output.moved.is_empty()
            && self.forgotten.is_empty()
            && self.initialized
            && !self.tracked.values().any(|t| t.dirty);
        if nothing_new {
            return Ok(false);
        }
        let more = output.more;
        match self.commit(output) {
            Ok(()) => Ok(more),
            Err(StageError::Queue(QueueError::Full)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn admits(&self) -> Result<bool, StageError> {
        let rtxn = self.queue.read()?;
        Ok(self.queue.admits(&rtxn)?)
    }

    /// Matches `include` and `exclude`, opens new files, notices truncation and files gone.
    fn discover(&mut self) {
        for tracked in self.tracked.values_mut() {
            tracked.seen = false;
        }
        let fingerprint_size = self.config.fingerprint_size.as_usize();
        let start_at_end = !self.initialized && self.config.start_at == StartAt::End;
        let mut found: Vec<std::path::PathBuf> = Vec::new();
        for pattern in &self.config.include {
            let Ok(paths) = glob::glob(pattern) else { continue };
            found.extend(paths.flatten().filter(|path| !self.exclude.iter().any(|ex| ex.matches_path(path))));
        }
        found.sort();
        found.dedup();
        for path in found {
            let shown = path.display().to_string();
            if let Some(existing) = self.tracked_by_path(&shown) {
                existing.seen = true;
                continue;
            }
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(err) => {
                    if self.unreadable.insert(shown.clone()) {
                        tracing::warn!(file = %shown, error = %err, "cannot open log file");
                    }
                    continue;
                }
            };
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let Ok((id, size)) = files::identity(&file) else { continue };
            if let Some(existing) = self.tracked.get_mut(&id) {
                // The same file under a new name (renamed within `include`).
                existing.path = shown;
                existing.seen = true;
                continue;
            }
            let Ok(current) = files::fingerprint(&file, fingerprint_size) else { continue };
            let stored = self.stored.remove(&id);
            let start =
                files::starting_point(&current, size, stored.as_ref(), &self.tracked, fingerprint_size, start_at_end);
            let origin = stored.map(|c| c.origin).unwrap_or_else(|| shown.clone());
            tracing::debug!(file = %shown, offset = start.offset, copy = start.copy_of.is_some(), "tailing file");
            let checkpoint = Checkpoint {
                offset: start.offset,
                skipping: start.skipping,
                awaiting_copy: start.copy_of.is_some(),
                fingerprint: current,
                origin,
            };
            let copy_of = start.copy_of.filter(|original| !original.is_empty());
            let original = start.original;
            let tracked =
                Tracked { file, path: shown, checkpoint, dirty: true, seen: true, partial: None, copy_of, original };
            self.tracked.insert(id, tracked);
        }
        self.check_tracked(fingerprint_size);
    }

    /// The tracked file last seen at `path`, if that path still names the same file.
    fn tracked_by_path(&mut self, path: &str) -> Option<&mut Tracked> {
        let meta = std::fs::metadata(path).ok()?;
        let id = (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
        self.tracked.get_mut(&id).filter(|tracked| tracked.path == path)
    }

    /// Truncation, changed first bytes, growing fingerprints, and files gone and drained.
    fn check_tracked(&mut self, fingerprint_size: usize) {
        let mut gone = Vec::new();
        // Where originals stood when they were truncated in this poll.
        let mut truncated_at: HashMap<FileId, u64> = HashMap::new();
        for (id, tracked) in &mut self.tracked {
            if tracked.original.is_some() {
                continue;
            }
            let Ok((_, size)) = files::identity(&tracked.file) else { continue };
            let known = &tracked.checkpoint.fingerprint;
            let head = files::fingerprint(&tracked.file, known.len().max(fingerprint_size.min(size as usize)))
                .unwrap_or_default();
            if tracked.checkpoint.awaiting_copy {
                // A copy still being written: nothing to read before the original's position,
                // as long as its bytes keep matching the original's.
                let diverged = tracked.copy_of.as_ref().is_some_and(|original| {
                    let common = head.len().min(original.len());
                    head[..common] != original[..common]
                });
                if diverged {
                    tracing::info!(file = %tracked.path, "file looked like a copy of a tailed file but is not; reading it from the start");
                    tracked.checkpoint.offset = 0;
                }
                if diverged || size >= tracked.checkpoint.offset {
                    tracked.checkpoint.awaiting_copy = false;
                    tracked.copy_of = None;
                    tracked.dirty = true;
                }
                if head.len() > known.len() {
                    tracked.checkpoint.fingerprint = head;
                    tracked.dirty = true;
                }
                continue;
            }
            let truncated = size < tracked.checkpoint.offset || !head.starts_with(known);
            if truncated {
                tracing::info!(file = %tracked.path, "log file truncated or rewritten; reading it from the start");
                truncated_at.insert(*id, tracked.checkpoint.offset);
                tracked.checkpoint.offset = 0;
                tracked.checkpoint.skipping = false;
                tracked.partial = None;
            }
            if truncated || head.len() > known.len() {
                tracked.checkpoint.fingerprint = head;
                tracked.dirty = true;
            }
            if !tracked.seen && tracked.drained(size) && tracked.partial.is_none() {
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(tracked) = self.tracked.remove(&id) {
                tracing::debug!(file = %tracked.path, "log file gone and fully read; no longer tailed");
                truncated_at.insert(id, tracked.checkpoint.offset);
            }
            self.forgotten.push(id);
        }
        self.follow_originals(&truncated_at, fingerprint_size);
    }

    /// Copies whose original is still tailed follow its position without being read; once the
    /// original is truncated or gone (`released_at`: where it stood), the copy is read on from
    /// there. A "copy" whose bytes stop matching the original's is a file of its own after all.
    fn follow_originals(&mut self, released_at: &HashMap<FileId, u64>, fingerprint_size: usize) {
        let offsets: HashMap<FileId, u64> = self.tracked.iter().map(|(id, t)| (*id, t.checkpoint.offset)).collect();
        for tracked in self.tracked.values_mut() {
            let Some(original) = tracked.original else { continue };
            let Ok((_, size)) = files::identity(&tracked.file) else { continue };
            let head = files::fingerprint(&tracked.file, fingerprint_size.min(size as usize)).unwrap_or_default();
            let diverged = tracked.copy_of.as_ref().is_some_and(|bytes| {
                let common = head.len().min(bytes.len());
                head[..common] != bytes[..common]
            });
            let (release, at) = match (released_at.get(&original), offsets.get(&original)) {
                _ if diverged => (true, 0),
                (Some(at), _) => (true, *at),
                (None, Some(at)) => (false, *at),
                (None, None) => (true, tracked.checkpoint.offset),
            };
            let offset = if diverged { 0 } else { tracked.checkpoint.offset.max(at) };
            tracked.dirty |= offset != tracked.checkpoint.offset || release;
            tracked.checkpoint.offset = offset;
            if release {
                tracing::debug!(file = %tracked.path, offset = tracked.checkpoint.offset, diverged, "copy released");
                tracked.original = None;
                tracked.copy_of = None;
                tracked.checkpoint.awaiting_copy = tracked.checkpoint.offset > size;
                if head.len() > tracked.checkpoint.fingerprint.len() {
                    tracked.checkpoint.fingerprint = head;
                }
            }
        }
    }

    /// Reads new lines of every tracked file, up to one output batch.
    fn read_files(&mut self) -> PollOutput {
        let mut output = PollOutput::default();
        let limits = ReadLimits {
            max_log_size: self.config.max_log_size.as_usize(),
            max_bytes: MAX_OUTPUT_BATCH_BYTES,
            force_flush_period: self.config.force_flush_period,
        };
        let observed = wall_now();
        let now = Instant::now();
        let ids: Vec<FileId> = self.tracked.keys().copied().collect();
        let mut buffer = std::mem::take(&mut self.read_buffer);
        for id in ids {
            if output.bytes >= MAX_OUTPUT_BATCH_BYTES {
                output.more = true;
                break;
            }
            let Some(tracked) = self.tracked.get_mut(&id) else { continue };
            if tracked.original.is_some() {
                // A copy whose lines the original still delivers.
                continue;
            }
            let Ok((_, size)) = files::identity(&tracked.file) else { continue };
            let chunk = match tracked.read(size, limits, now, &mut buffer) {
                Ok(chunk) => chunk,
                Err(err) => {
                    tracing::warn!(file = %tracked.path, error = %err, "cannot read log file");
                    continue;
                }
            };
            if chunk.offset == tracked.checkpoint.offset && chunk.skipping == tracked.checkpoint.skipping {
                continue;
            }
            if chunk.offset < size {
                output.more |= !chunk.lines.is_empty() && tracked.partial.is_none();
            }
            let drift = output.drift.entry(tracked.checkpoint.origin.clone()).or_default();
            for _ in 0..chunk.cut {
                drift.count("line_truncated", None);
            }
            let attributes = self.parser.file_attributes(&tracked.path);
            for line in &chunk.lines {
                let bytes = &buffer[line.clone()];
                let text = match std::str::from_utf8(bytes) {
                    Ok(text) => std::borrow::Cow::Borrowed(text),
                    Err(_) => {
                        drift.count("invalid_utf8", None);
                        String::from_utf8_lossy(bytes)
                    }
                };
                let parsed = self.parser.parse_with(&text, &attributes, observed, drift);
                let service =
                    parsed.service.as_deref().or_else(|| self.config.resource.get("service.name").map(String::as_str));
                let scope = scope_of(&mut output.services, service.unwrap_or_default());
                output.bytes += parsed.record.len();
                output.logs.push(LogEntry {
                    trace_id: parsed.trace_id,
                    span_id: parsed.span_id,
                    time_unix_nano: if parsed.time_unix_nano != 0 { parsed.time_unix_nano } else { observed },
                    severity_number: parsed.severity_number,
                    duration_nanos: parsed.duration_nanos,
                    scope,
                    body: parsed.record,
                });
            }
            output.moved.push((id, chunk.offset, chunk.skipping));
        }
        if !output.more && buffer.len() > READ_BUFFER_KEEP {
            buffer.truncate(READ_BUFFER_KEEP);
            buffer.shrink_to_fit();
        }
        self.read_buffer = buffer;
        output
    }

    /// Commits records, checkpoints, drift counts and the start marker in one transaction.
    fn commit(&mut self, mut output: PollOutput) -> Result<(), StageError> {
        let records = output.logs.len() as u64;
        let logs = std::mem::take(&mut output.logs);
        let batch = (!logs.is_empty()).then(|| self.batch_of(&output.services, logs));
        let encoded = batch.as_ref().map(batch::encode_logs).transpose()?;
        // Counted only if the lines are committed: a refused commit reads them again.
        let before = self.drift.clone();
        for (path, drift) in &output.drift {
            self.drift.merge(path, drift);
        }
        let committed = self.commit_with(output, records, encoded);
        if committed.is_err() {
            self.drift = before;
        }
        committed
    }

    fn commit_with(&mut self, output: PollOutput, records: u64, encoded: Option<Vec<u8>>) -> Result<(), StageError> {
        let mut wtxn = self.queue.write()?;
        if !self.queue.admits_bytes(&wtxn, encoded.as_ref().map_or(0, |e| e.len() as u64))? {
            return Err(StageError::Queue(QueueError::Full));
        }
        if let Some(encoded) = encoded {
            self.queue.append(&mut wtxn, Edge::Logs, &encoded)?;
        }
        let moved: HashMap<FileId, (u64, bool)> =
            output.moved.iter().map(|(id, offset, skipping)| (*id, (*offset, *skipping))).collect();
        let mut written = Vec::new();
        for (id, tracked) in &self.tracked {
            let Some(&(offset, skipping)) = moved.get(id) else {
                if tracked.dirty {
                    self.queue.state_put(&mut wtxn, &files::checkpoint_key(*id), &tracked.checkpoint.encode())?;
                    written.push(*id);
                }
                continue;
            };
            let checkpoint = Checkpoint { offset, skipping, ..tracked.checkpoint.clone() };
            self.queue.state_put(&mut wtxn, &files::checkpoint_key(*id), &checkpoint.encode())?;
            written.push(*id);
        }
        for id in &self.forgotten {
            self.queue.state_delete(&mut wtxn, &files::checkpoint_key(*id))?;
        }
        for (key, value) in self.drift.take_changes() {
            self.queue.state_put(&mut wtxn, &key, &value)?;
        }
        if !self.initialized {
            self.queue.state_put(&mut wtxn, INITIALIZED_KEY, &[1])?;
        }
        self.queue.commit(wtxn)?;
        self.initialized = true;
        self.forgotten.clear();
        for id in written {
            if let Some(tracked) = self.tracked.get_mut(&id) {
                if let Some(&(offset, skipping)) = moved.get(&id) {
                    tracked.checkpoint.offset = offset;
                    tracked.checkpoint.skipping = skipping;
                }
                tracked.dirty = false;
            }
        }
        if records > 0 {
            self.events.received(records);
            self.events.sent(records);
            self.waker.edge_written(Edge::Logs);
        }
        Ok(())
    }

    fn batch_of(&self, services: &BTreeMap<String, u32>, logs: Vec<LogEntry>) -> LogBatch {
        let mut resources = Vec::with_capacity(services.len());
        let mut scopes = Vec::with_capacity(services.len());
        let mut by_scope: Vec<(&String, u32)> = services.iter().map(|(s, i)| (s, *i)).collect();
        by_scope.sort_by_key(|(_, index)| *index);
        for (service, _) in by_scope {
            let mut attributes: Vec<KeyValue> = self
                .config
                .resource
                .iter()
                .filter(|(key, _)| key.as_str() != "service.name")
                .map(|(key, value)| string_kv(key, value))
                .collect();
            if !service.is_empty() {
                attributes.insert(0, string_kv("service.name", service));
            }
            let resource = Resource { attributes, ..Default::default() }.encode_to_vec();
            scopes.push(ScopeBlock { resource: resources.len() as u32, scope: Vec::new(), schema_url: String::new() });
            resources.push(ResourceBlock { resource, schema_url: String::new(), service_name: service.clone() });
        }
        LogBatch { received_unix_nano: pipeline_now(), resources, scopes, logs }
    }
}

fn scope_of(services: &mut BTreeMap<String, u32>, service: &str) -> u32 {
    if let Some(scope) = services.get(service) {
        return *scope;
    }
    let next = services.len() as u32;
    services.insert(service.to_owned(), next);
    next
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

/// Drift counts per file as stored in the queue (for `tailgate status` and the self-metrics),
/// read in the caller's transaction.
pub fn stored_drift(
    queue: &Queue,
    rtxn: &tailgate_ipc::queue::ReadTxn<'_>,
) -> Result<Vec<(String, Drift)>, QueueError> {
    let mut out = Vec::new();
    for (key, value) in queue.state_prefix(rtxn, DRIFT_PREFIX)? {
        let Some(path) = key.strip_prefix(DRIFT_PREFIX).and_then(|p| std::str::from_utf8(p).ok()) else { continue };
        if let Ok(drift) = serde_json::from_slice::<Drift>(value) {
            out.push((path.to_owned(), drift));
        }
    }
    Ok(out)
}
