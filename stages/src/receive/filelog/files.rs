//! Which files are tailed and where each one stands.
//!
//! A file is identified by device and inode plus a fingerprint: its first bytes (up to
//! `fingerprint_size`), as the Collector's filelog receiver does. Consequences:
//! - rotation by rename keeps the inode: the renamed file is read to its end through the open
//!   handle (also when the new name no longer matches `include`), and the new file at the old
//!   path is a new file, read from its beginning;
//! - copytruncate: the original shrinks (or its first bytes change) and is read again from its
//!   beginning; a copy that matches `include` is recognised by its fingerprint and read from where
//!   the original had got to, so nothing is read twice (lines written between the last read and
//!   the copy are in the copy; if the copy is outside `include` they are lost, as with any tailer).
//!   A copy still being written (shorter than that position, or than the fingerprint) waits until
//!   it has grown past the position; should its bytes stop matching the original's, it is a new
//!   file after all and is read from its start;
//! - an inode reused by a new file does not inherit the old file's offset (fingerprint differs).
//!
//! Known limit (shared with the Collector): a new file whose first bytes equal everything a
//! tracked file ever held (a quiet file whose lines carry no timestamp, rotated by rename) is
//! taken for a copy, and those first bytes are not read again.
//!
//! Checkpoints (`filelog/file/<dev><ino>` in the queue's `state` table: offset, whether the
//! reader is skipping the rest of a cut line, fingerprint, first path) are written in the same
//! transaction as the lines read up to them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

/// State key prefix of the per-file checkpoints.
pub const CHECKPOINT_PREFIX: &[u8] = b"filelog/file/";
/// State key marking that the receiver has run before (`start_at` applies only before it).
pub const INITIALIZED_KEY: &[u8] = b"filelog/initialized";

/// Device and inode.
pub type FileId = (u64, u64);

/// Where a file stands, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Next byte to read.
    pub offset: u64,
    /// Whether the bytes at `offset` are the rest of a line that was cut at `max_log_size`.
    pub skipping: bool,
    /// Whether the file is a copy still growing towards `offset` (nothing to read before it).
    pub awaiting_copy: bool,
    /// The file's first bytes.
    pub fingerprint: Vec<u8>,
    /// The path the file was first seen under (drift counts are kept per this path).
    pub origin: String,
}

impl Checkpoint {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.fingerprint.len() + self.origin.len());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.push(u8::from(self.skipping) | (u8::from(self.awaiting_copy) << 1));
        out.extend_from_slice(&(self.fingerprint.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(self.origin.as_bytes());
        out
    }

    /// Reads the stored form.
    pub fn decode(raw: &[u8]) -> Option<Checkpoint> {
        let offset = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let flags = *raw.get(8)?;
        let (skipping, awaiting_copy) = (flags & 1 != 0, flags & 2 != 0);
        let length = u32::from_be_bytes(raw.get(9..13)?.try_into().ok()?) as usize;
        let fingerprint = raw.get(13..13 + length)?.to_vec();
        let origin = String::from_utf8(raw.get(13 + length..)?.to_vec()).ok()?;
        Some(Checkpoint { offset, skipping, awaiting_copy, fingerprint, origin })
    }
}

/// The state key of a file's checkpoint.
pub fn checkpoint_key(id: FileId) -> Vec<u8> {
    [CHECKPOINT_PREFIX, &id.0.to_be_bytes(), &id.1.to_be_bytes()].concat()
}

/// The file id in a checkpoint key.
pub fn checkpoint_id(key: &[u8]) -> Option<FileId> {
    let rest = key.strip_prefix(CHECKPOINT_PREFIX)?;
    Some((u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?)))
}

/// A file being tailed.
#[derive(Debug)]
pub struct Tracked {
    /// The open handle: reading goes on through it after a rename or unlink.
    pub file: File,
    /// The path it was last seen under.
    pub path: String,
    /// Where it stands (committed).
    pub checkpoint: Checkpoint,
    /// Whether the checkpoint changed since it was stored.
    pub dirty: bool,
    /// Whether `include` matched it in the last poll.
    pub seen: bool,
    /// An unterminated last line: (file size when first seen, since when).
    pub partial: Option<(u64, Instant)>,
    /// For a copy still being written: the original's first bytes it must keep matching.
    pub copy_of: Option<Vec<u8>>,
    /// For a copy whose original is still tailed and not yet truncated: the original. The copy
    /// is not read meanwhile (its lines are the original's); its position follows the
    /// original's, and it is released where the original stood when that is truncated or gone.
    pub original: Option<FileId>,
}

/// Lines read from one file, and where the file will stand once they are committed.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Complete (or force-flushed, or cut) lines, without their newline: ranges of the read
    /// buffer passed to [`Tracked::read`].
    pub lines: Vec<std::ops::Range<usize>>,
    /// Lines cut at `max_log_size`.
    pub cut: u64,
    /// The offset after these lines.
    pub offset: u64,
    /// Whether the reader is inside a cut line at `offset`.
    pub skipping: bool,
}

/// Limits of one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Longest line.
    pub max_log_size: usize,
    /// Most bytes read from one file in one go.
    pub max_bytes: usize,
    /// How long an unterminated last line waits for its newline.
    pub force_flush_period: Duration,
}

impl Tracked {
    /// Reads lines after the checkpoint (nothing is committed here).
    ///
    /// The bytes are read into `buffer` (reused across reads: it grows to the largest read and
    /// is only zeroed as it grows); the chunk's lines are ranges of it.
    pub fn read(
        &mut self,
        size: u64,
        limits: ReadLimits,
        now: Instant,
        buffer: &mut Vec<u8>,
    ) -> std::io::Result<Chunk> {
        let start = self.checkpoint.offset;
        let mut chunk = Chunk { offset: start, skipping: self.checkpoint.skipping, ..Chunk::default() };
        if size <= start {
            self.partial = None;
            return Ok(chunk);
        }
        let want =
            usize::try_from(size - start).unwrap_or(usize::MAX).min(limits.max_bytes.max(limits.max_log_size + 1));
        if buffer.len() < want {
            buffer.resize(want, 0);
        }
        let got = read_full_at(&self.file, &mut buffer[..want], start)?;
        let buffer = &buffer[..got];
        let at_eof = start + got as u64 >= size;
        let mut position = 0usize;
        while position < buffer.len() {
            let rest = &buffer[position..];
            match memchr::memchr(b'\n', rest) {
                Some(newline) => {
                    if chunk.skipping {
                        chunk.skipping = false;
                    } else {
                        let mut end = newline;
                        if rest[..end].last() == Some(&b'\r') {
                            end -= 1;
                        }
                        if end > limits.max_log_size {
                            chunk.cut += 1;
                            end = limits.max_log_size;
                        }
                        chunk.lines.push(position..position + end);
                    }
                    position += newline + 1;
                }
                None if chunk.skipping => position = buffer.len(),
                None if rest.len() >= limits.max_log_size => {
                    chunk.cut += 1;
                    chunk.lines.push(position..position + limits.max_log_size);
                    chunk.skipping = true;
                    position += limits.max_log_size;
                }
                None if at_eof => {
                    // An unterminated last line: wait for its newline, at most force_flush_period
                    // after the file stopped growing.
                    let since = match self.partial {
                        Some((seen_size, since)) if seen_size == size => since,
                        _ => {
                            self.partial = Some((size, now));
                            now
                        }
                    };
                    if now.duration_since(since) >= limits.force_flush_period {
                        chunk.lines.push(position..buffer.len());
                        position = buffer.len();
                        self.partial = None;
                    }
                    break;
                }
                None => break,
            }
        }
        chunk.offset = start + position as u64;
        Ok(chunk)
    }

    /// Whether everything in the file has been read (nothing waits).
    pub fn drained(&self, size: u64) -> bool {
        self.checkpoint.offset >= size && !self.checkpoint.skipping
    }
}

fn read_full_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(read) => done += read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

/// The first `max` bytes of a file (fewer if it is shorter).
pub fn fingerprint(file: &File, max: usize) -> std::io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; max];
    let got = read_full_at(file, &mut buffer, 0)?;
    buffer.truncate(got);
    Ok(buffer)
}

/// Device and inode of an open file, and its size.
pub fn identity(file: &File) -> std::io::Result<(FileId, u64)> {
    let meta = file.metadata()?;
    Ok(((meta.dev(), meta.ino()), meta.size()))
}

/// Where a newly found file starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// First byte to read.
    pub offset: u64,
    /// Inside a cut line.
    pub skipping: bool,
    /// A copy still growing towards `offset`, with the original's first bytes when known.
    pub copy_of: Option<Vec<u8>>,
    /// The tracked file this one is a copy of.
    pub original: Option<FileId>,
}

/// Where a newly found file starts: its own checkpoint (same inode, same first bytes), else the
/// position of a tracked file it is a copy of, else the beginning (or the end, for files found
/// at the very first start with `start_at: end`).
pub fn starting_point(
    current: &[u8],
    size: u64,
    stored: Option<&Checkpoint>,
    tracked: &HashMap<FileId, Tracked>,
    fingerprint_size: usize,
    start_at_end: bool,
) -> Start {
    if let Some(checkpoint) = stored
        && current.starts_with(&checkpoint.fingerprint)
        && (checkpoint.offset <= size || checkpoint.awaiting_copy)
    {
        let copy_of = (checkpoint.offset > size).then(Vec::new);
        return Start { offset: checkpoint.offset, skipping: checkpoint.skipping, copy_of, original: None };
    }
    let copy_of = tracked.iter().find(|(_, other)| {
        let known = &other.checkpoint.fingerprint;
        // The known bytes must be all the original's first bytes up to the fingerprint size or
        // up to where it was read, so that only a copy can match; a copy still being written
        // may hold fewer of them yet.
        let whole = known.len() >= fingerprint_size || known.len() as u64 >= other.checkpoint.offset;
        let matches = current.starts_with(known) || (current.len() as u64 == size && known.starts_with(current));
        known.len() >= 16 && current.len() >= 16 && whole && matches
    });
    if let Some((id, original)) = copy_of {
        let offset = original.checkpoint.offset;
        let growing = (offset > size || current.len() < original.checkpoint.fingerprint.len())
            .then(|| original.checkpoint.fingerprint.clone());
        return Start { offset, skipping: false, copy_of: growing, original: Some(*id) };
    }
    Start { offset: if start_at_end { size } else { 0 }, skipping: false, copy_of: None, original: None }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn tracked(path: &std::path::Path) -> Tracked {
        Tracked {
            file: File::open(path).unwrap(),
            path: path.display().to_string(),
            checkpoint: Checkpoint {
                offset: 0,
                skipping: false,
                awaiting_copy: false,
                fingerprint: Vec::new(),
                origin: String::new(),
            },
            dirty: false,
            seen: true,
            partial: None,
            copy_of: None,
            original: None,
        }
    }

    fn lines<'a>(chunk: &Chunk, buffer: &'a [u8]) -> Vec<&'a [u8]> {
        chunk.lines.iter().map(|line| &buffer[line.clone()]).collect()
    }

    const LIMITS: ReadLimits =
        ReadLimits { max_log_size: 16, max_bytes: 1 << 20, force_flush_period: Duration::from_millis(500) };

    #[test]
    fn lines_partial_tails_and_cut_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut writer = File::create(&path).unwrap();
        writer.write_all(b"one\r\ntwo\nthis line is far too long for the limit\nthree\npart").unwrap();
        let mut file = tracked(&path);
        let size = std::fs::metadata(&path).unwrap().len();
        let t0 = Instant::now();
        let mut buffer = Vec::new();
        let chunk = file.read(size, LIMITS, t0, &mut buffer).unwrap();
        assert_eq!(lines(&chunk, &buffer), vec![&b"one"[..], b"two", b"this line is far", b"three"]);
        assert_eq!(chunk.cut, 1);
        assert_eq!(chunk.offset, size - 4, "the partial line waits");
        file.checkpoint.offset = chunk.offset;
        // Still unterminated after the flush period: emitted.
        let later = t0 + Duration::from_secs(1);
        // A longer buffer left from an earlier read holds stale bytes past this read.
        buffer.resize(4096, b'#');
        let chunk = file.read(size, LIMITS, later, &mut buffer).unwrap();
        assert_eq!(lines(&chunk, &buffer), vec![&b"part"[..]]);
        assert_eq!(chunk.offset, size);
    }

    #[test]
    fn a_cut_line_is_skipped_to_its_end_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut writer = File::create(&path).unwrap();
        writer.write_all(&[b'x'; 40]).unwrap();
        let mut file = tracked(&path);
        let mut buffer = Vec::new();
        let chunk = file.read(40, LIMITS, Instant::now(), &mut buffer).unwrap();
        assert_eq!((chunk.lines.len(), chunk.skipping, chunk.cut), (1, true, 1));
        file.checkpoint.offset = chunk.offset;
        file.checkpoint.skipping = chunk.skipping;
        writer.write_all(b"yy\nnext\n").unwrap();
        let chunk = file.read(48, LIMITS, Instant::now(), &mut buffer).unwrap();
        assert_eq!(lines(&chunk, &buffer), vec![&b"next"[..]]);
        assert!(!chunk.skipping);
    }

    #[test]
    fn checkpoints_round_trip() {
        let checkpoint = Checkpoint {
            offset: 42,
            skipping: true,
            awaiting_copy: true,
            fingerprint: b"{\"a\":1}".to_vec(),
            origin: "/x/a.log".into(),
        };
        assert_eq!(Checkpoint::decode(&checkpoint.encode()), Some(checkpoint));
        assert_eq!(checkpoint_id(&checkpoint_key((7, 9))), Some((7, 9)));
    }

    #[test]
    fn a_copy_is_recognised_while_it_is_still_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let content: Vec<u8> = (0..200).flat_map(|n| format!("{{\"n\":{n:05}}}\n").into_bytes()).collect();
        std::fs::write(&path, &content).unwrap();
        let mut original = tracked(&path);
        original.checkpoint.fingerprint = content[..1000].to_vec();
        original.checkpoint.offset = content.len() as u64;
        let files = HashMap::from([((1, 1), original)]);
        // The copy so far holds 500 bytes: fewer than the fingerprint and than the position.
        let start = starting_point(&content[..500], 500, None, &files, 1000, false);
        assert_eq!(start.offset, content.len() as u64);
        assert_eq!(start.copy_of.as_deref(), Some(&content[..1000]));
        // Other bytes of the same length are a new file.
        let other: Vec<u8> = content[..500].iter().map(|b| b.wrapping_add(1)).collect();
        assert_eq!(starting_point(&other, 500, None, &files, 1000, false).offset, 0);
    }
}
