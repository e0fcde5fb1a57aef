//! Two clocks: wall time for what leaves the node, pipeline time for everything inside it.
//!
//! Wall time (`CLOCK_REALTIME`) can jump: an edge box without a real-time clock boots near 1970
//! and NTP steps it forward by decades, an operator sets it back by an hour. Every receive
//! stamp, decision due time, decision stamp, watermark and queue age inside the pipeline is on
//! **pipeline time** instead: `CLOCK_BOOTTIME` (monotonic, counts suspend) shifted onto the Unix
//! epoch by an anchor taken once per boot and stored in the queue (`meta` key
//! [`ANCHOR_KEY`]). Every process that opens the queue (stages, supervisor, CLI) reads the same
//! anchor, so their pipeline times agree to the nanosecond and never jump.
//!
//! - Same boot (the kernel's `boot_id` matches the stored one): the stored anchor is reused, so
//!   pipeline time runs on across supervisor and stage restarts whatever the wall clock did.
//! - New boot: the anchor is the wall time now, but never earlier than the newest receive stamp
//!   in the queue, so stamps stay in order across a reboot into an unset clock.
//!
//! Pipeline time drifts from wall time by whatever steps the wall clock took since the anchor;
//! it is never exported. Timestamps that leave the node (observed times, metric sample times,
//! push ranges a backend checks against its own clock) use [`wall_now`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::queue::{Queue, QueueError};
use crate::topology::Edge;

/// Meta key of the pipeline clock's anchor: boot id (16 bytes), wall nanos, boottime nanos.
pub const ANCHOR_KEY: &str = "clock/anchor";

/// Test-only shift of the wall clock, nanoseconds (see [`set_test_wall_offset`]).
static WALL_OFFSET: AtomicI64 = AtomicI64::new(0);

/// The anchor this process uses for [`pipeline_now`].
static ANCHOR: OnceLock<Anchor> = OnceLock::new();

/// Maps `CLOCK_BOOTTIME` onto Unix time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The kernel's boot id when the anchor was taken.
    pub boot_id: [u8; 16],
    /// Unix nanoseconds at the anchor.
    pub wall: u64,
    /// `CLOCK_BOOTTIME` nanoseconds at the anchor.
    pub boottime: u64,
}

impl Anchor {
    /// Pipeline time at boottime `boottime`.
    pub fn at(&self, boottime: u64) -> u64 {
        self.wall.saturating_add(boottime.saturating_sub(self.boottime))
    }

    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.boot_id);
        out[16..24].copy_from_slice(&self.wall.to_be_bytes());
        out[24..].copy_from_slice(&self.boottime.to_be_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Option<Anchor> {
        let raw: &[u8; 32] = raw.try_into().ok()?;
        let word = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap_or_default());
        Some(Anchor { boot_id: raw[..16].try_into().ok()?, wall: word(16), boottime: word(24) })
    }
}

/// Wall-clock Unix nanoseconds (plus the test-only offset, 0 in a deployment).
pub fn wall_now() -> u64 {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    wall.saturating_add_signed(WALL_OFFSET.load(Ordering::Relaxed))
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_now() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (now.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(now.tv_nsec as u64)
}

/// Pipeline time, Unix nanoseconds on a clock that never jumps. Before [`install`] (unit tests,
/// tools that do not open a queue) it is anchored at its first use.
pub fn pipeline_now() -> u64 {
    let anchor = ANCHOR.get_or_init(|| Anchor { boot_id: boot_id(), wall: wall_now(), boottime: boottime_now() });
    anchor.at(boottime_now())
}

/// Makes `anchor` this process's pipeline clock (once; a later call keeps the first anchor,
/// which is the same for every caller within a boot).
pub fn install(anchor: Anchor) {
    let _ = ANCHOR.set(anchor);
}

/// Shifts [`wall_now`] by `nanos` in this process: how tests step the wall clock as NTP would.
pub fn set_test_wall_offset(nanos: i64) {
    WALL_OFFSET.store(nanos, Ordering::Relaxed);
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), zeros when unreadable (then every
/// start counts as a new boot: the anchor is retaken, still never behind the queue's stamps).
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        out[i] = (digit(pair[0]) << 4) | pair.get(1).map_or(0, |c| digit(*c));
    }
    out
}

/// The anchor stored in the queue if it was taken in this boot (a reader's view: nothing is
/// written).
pub fn stored(queue: &Queue, txn: &heed::RoTxn<'_>) -> Result<Option<Anchor>, QueueError> {
    let boot = boot_id();
    Ok(queue.get_meta(txn, ANCHOR_KEY)?.and_then(Anchor::decode).filter(|a| a.boot_id == boot && boot != [0u8; 16]))
}

/// Pipeline time as read from a queue opened read-only: by its anchor of this boot, by the wall
/// clock when there is none yet.
pub fn pipeline_now_of(queue: &Queue, txn: &heed::RoTxn<'_>) -> Result<u64, QueueError> {
    Ok(stored(queue, txn)?.map_or_else(wall_now, |anchor| anchor.at(boottime_now())))
}

/// The queue's pipeline clock: the stored anchor when it was taken in this boot, otherwise a new
/// one (stored). Installs it for [`pipeline_now`] and returns it.
pub fn establish(queue: &Queue) -> Result<Anchor, QueueError> {
    let boot = boot_id();
    let rtxn = queue.read()?;
    if let Some(anchor) = stored(queue, &rtxn)? {
        drop(rtxn);
        install(anchor);
        return Ok(anchor);
    }
    let mut newest = 0u64;
    for edge in Edge::ALL {
        let last = queue.depth(&rtxn, edge)?.next_seq.saturating_sub(1);
        if let Some(value) = queue.get(&rtxn, edge, last)? {
            newest = newest.max(crate::batch::received_unix_nano(value).unwrap_or(0));
        }
    }
    drop(rtxn);
    let wall = wall_now();
    if newest > wall {
        tracing::warn!(
            behind_ms = (newest - wall) / 1_000_000,
            "the wall clock is behind the queue's newest receive stamp: pipeline time continues from the stamp"
        );
    }
    let anchor = Anchor { boot_id: boot, wall: wall.max(newest.saturating_add(1)), boottime: boottime_now() };
    let mut wtxn = queue.write()?;
    // Another process may have anchored this boot meanwhile: the first anchor wins.
    let anchor = match queue.get_meta(&wtxn, ANCHOR_KEY)?.and_then(Anchor::decode) {
        Some(existing) if existing.boot_id == boot && boot != [0u8; 16] => existing,
        _ => {
            queue.put_meta(&mut wtxn, ANCHOR_KEY, &anchor.encode())?;
            anchor
        }
    };
    queue.commit(wtxn)?;
    install(anchor);
    Ok(anchor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_time_follows_boottime_from_the_anchor() {
        let anchor = Anchor { boot_id: [1; 16], wall: 1_000, boottime: 50 };
        assert_eq!(anchor.at(50), 1_000);
        assert_eq!(anchor.at(1_050), 2_000);
        assert_eq!(Anchor::decode(&anchor.encode()), Some(anchor));
    }

    #[test]
    fn boot_id_is_read() {
        assert_ne!(boot_id(), [0u8; 16]);
    }
}
