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
//!   the copy are in the copy; if the copy is outside `include` they are lost, as with any tailer);
//! - an inode reused by a new file does not inherit the old file's offset (fingerprint differs).
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
        out.push(u8::from(self.skipping));
        out.extend_from_slice(&(self.fingerprint.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(self.origin.as_bytes());
        out
    }

    /// Reads the stored form.
    pub fn decode(raw: &[u8]) -> Option<Checkpoint> {
        let offset = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let skipping = *raw.get(8)? == 1;
        let length = u32::from_be_bytes(raw.get(9..13)?.try_into().ok()?) as usize;
        let fingerprint = raw.get(13..13 + length)?.to_vec();
        let origin = String::from_utf8(raw.get(13 + length..)?.to_vec()).ok()?;
        Some(Checkpoint { offset, skipping, fingerprint, origin })
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
}

/// Lines read from one file, and where the file will stand once they are committed.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Complete (or force-flushed, or cut) lines, without their newline.
    pub lines: Vec<Vec<u8>>,
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
    pub fn read(&mut self, size: u64, limits: ReadLimits, now: Instant) -> std::io::Result<Chunk> {
        let start = self.checkpoint.offset;
        let mut chunk = Chunk { offset: start, skipping: self.checkpoint.skipping, ..Chunk::default() };
        if size <= start {
            self.partial = None;
            return Ok(chunk);
        }
        let want =
            usize::try_from(size - start).unwrap_or(usize::MAX).min(limits.max_bytes.max(limits.max_log_size + 1));
        let mut buffer = vec![0u8; want];
        let got = read_full_at(&self.file, &mut buffer, start)?;
        buffer.truncate(got);
        let at_eof = start + got as u64 >= size;
        let mut position = 0usize;
        while position < buffer.len() {
            let rest = &buffer[position..];
            match rest.iter().position(|b| *b == b'\n') {
                Some(newline) => {
                    if chunk.skipping {
                        chunk.skipping = false;
                    } else {
                        let mut line = &rest[..newline];
                        if line.last() == Some(&b'\r') {
                            line = &line[..line.len() - 1];
                        }
                        if line.len() > limits.max_log_size {
                            chunk.cut += 1;
                            line = &line[..limits.max_log_size];
                        }
                        chunk.lines.push(line.to_vec());
                    }
                    position += newline + 1;
                }
                None if chunk.skipping => position = buffer.len(),
                None if rest.len() >= limits.max_log_size => {
                    chunk.cut += 1;
                    chunk.lines.push(rest[..limits.max_log_size].to_vec());
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
                        chunk.lines.push(rest.to_vec());
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
) -> (u64, bool) {
    if let Some(checkpoint) = stored
        && current.starts_with(&checkpoint.fingerprint)
        && checkpoint.offset <= size
    {
        return (checkpoint.offset, checkpoint.skipping);
    }
    let copy_of = tracked.values().find(|other| {
        let known = &other.checkpoint.fingerprint;
        // The known bytes must be all the original's first bytes up to the fingerprint size or
        // up to where it was read, so that only a copy can match.
        known.len() >= 16
            && (known.len() >= fingerprint_size || known.len() as u64 >= other.checkpoint.offset)
            && current.starts_with(known)
    });
    if let Some(original) = copy_of {
        return (original.checkpoint.offset.min(size), false);
    }
    if start_at_end { (size, false) } else { (0, false) }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn tracked(path: &std::path::Path) -> Tracked {
        Tracked {
            file: File::open(path).unwrap(),
            path: path.display().to_string(),
            checkpoint: Checkpoint { offset: 0, skipping: false, fingerprint: Vec::new(), origin: String::new() },
            dirty: false,
            seen: true,
            partial: None,
        }
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
        let chunk = file.read(size, LIMITS, t0).unwrap();
        assert_eq!(
            chunk.lines,
            vec![b"one".to_vec(), b"two".to_vec(), b"this line is far".to_vec(), b"three".to_vec()]
        );
        assert_eq!(chunk.cut, 1);
        assert_eq!(chunk.offset, size - 4, "the partial line waits");
        file.checkpoint.offset = chunk.offset;
        // Still unterminated after the flush period: emitted.
        let later = t0 + Duration::from_secs(1);
        let chunk = file.read(size, LIMITS, later).unwrap();
        assert_eq!(chunk.lines, vec![b"part".to_vec()]);
        assert_eq!(chunk.offset, size);
    }

    #[test]
    fn a_cut_line_is_skipped_to_its_end_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut writer = File::create(&path).unwrap();
        writer.write_all(&[b'x'; 40]).unwrap();
        let mut file = tracked(&path);
        let chunk = file.read(40, LIMITS, Instant::now()).unwrap();
        assert_eq!((chunk.lines.len(), chunk.skipping, chunk.cut), (1, true, 1));
        file.checkpoint.offset = chunk.offset;
        file.checkpoint.skipping = chunk.skipping;
        writer.write_all(b"yy\nnext\n").unwrap();
        let chunk = file.read(48, LIMITS, Instant::now()).unwrap();
        assert_eq!(chunk.lines, vec![b"next".to_vec()]);
        assert!(!chunk.skipping);
    }

    #[test]
    fn checkpoints_round_trip() {
        let checkpoint =
            Checkpoint { offset: 42, skipping: true, fingerprint: b"{\"a\":1}".to_vec(), origin: "/x/a.log".into() };
        assert_eq!(Checkpoint::decode(&checkpoint.encode()), Some(checkpoint));
        assert_eq!(checkpoint_id(&checkpoint_key((7, 9))), Some((7, 9)));
    }
}
