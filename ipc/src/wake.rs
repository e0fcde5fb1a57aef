//! Wake-ups between stage processes: Unix datagram sockets, one per stage, under
//! `<data_dir>/run/<stage>.wake`.
//!
//! A producer that committed to an edge sends one byte to each consuming stage's socket; the
//! consumer blocks on its socket until a wake-up or its next own deadline (decision_wait,
//! batch timeout), so an idle pipeline uses no CPU. A lost wake-up costs latency, never data: a
//! consumer always reads the queue after binding its socket and after every wake-up, and the
//! datagram is only a hint. Sends never block: a full socket buffer already means "wake up".
//!
//! Only a consumer that may be asleep is sent one. Between waking and its next wait a consumer
//! is *busy* (a word in its heartbeat slot, [`Heartbeat::commit_needs_wake`]): it will read the
//! queue again before it sleeps. A producer counts every commit in the consumer's wake-up epoch
//! and skips the send while the consumer is busy; before it waits, the consumer clears busy and
//! looks at the epoch: a commit counted since it last woke makes it read the queue instead of
//! sleeping. Under load, when consumers are always busy, that saves a system call per commit
//! and consumer, and the cross-core wake-up each caused.

use std::os::unix::net::UnixDatagram as StdDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::heartbeat::Heartbeat;
use crate::topology::{Edge, StageId};

/// The directory holding the wake-up sockets.
pub fn socket_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

fn socket_path(dir: &Path, stage: StageId) -> PathBuf {
    dir.join(format!("{}.wake", stage.as_str()))
}

/// Sends wake-ups to consumers of edges.
///
/// Keeps one connected socket per target stage, so a wake-up is one `send` without a path
/// lookup; a send that fails (the target restarted and bound a new socket) reconnects once.
#[derive(Debug)]
pub struct Waker {
    dir: PathBuf,
    connected: std::sync::Mutex<[Target; StageId::ALL.len()]>,
}

/// A stage wake-ups go to: its socket and its heartbeat slot (whether it is busy), each opened
/// on first use.
#[derive(Debug, Default)]
struct Target {
    socket: Option<StdDatagram>,
    slot: Option<Heartbeat>,
}

impl Waker {
    /// A sender for the sockets under `dir` (see [`socket_dir`]).
    pub fn new(dir: &Path) -> std::io::Result<Waker> {
        Ok(Waker { dir: dir.to_path_buf(), connected: std::sync::Mutex::new(Default::default()) })
    }

    fn connect(&self, stage: StageId) -> Option<StdDatagram> {
        let socket = StdDatagram::unbound().ok()?;
        socket.set_nonblocking(true).ok()?;
        socket.connect(socket_path(&self.dir, stage)).ok()?;
        Some(socket)
    }

    /// Wakes every stage that consumes `edge` (once per stage, however many of its consumers
    /// read the edge).
    pub fn edge_written(&self, edge: Edge) {
        let mut woken = [false; StageId::ALL.len()];
        for consumer in edge.consumers() {
            let stage = consumer.stage();
            if !std::mem::replace(&mut woken[stage as usize], true) {
                self.wake(stage);
            }
        }
    }

    /// Wakes one stage. Errors are ignored on purpose: a stage that is not running reads the
    /// queue when it starts, and a full buffer means a wake-up is already pending.
    pub fn wake(&self, stage: StageId) {
        let Ok(mut connected) = self.connected.lock() else { return };
        let target = &mut connected[stage as usize];
        if target.slot.as_ref().is_some_and(|slot| !slot.commit_needs_wake()) {
            // Busy: it reads the queue before it sleeps again.
            return;
        }
        if let Some(socket) = target.socket.as_ref() {
            match socket.send(&[1]) {
                Ok(_) => return,
                // Buffer full: a wake-up is already pending.
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => target.socket = None,
            }
        }
        target.socket = self.connect(stage);
        if let Some(socket) = target.socket.as_ref() {
            let _ignored = socket.send(&[1]);
        }
        // A stage's slot exists once it has started (it claims it before binding its socket).
        if target.slot.is_none() && target.socket.is_some() {
            target.slot = Heartbeat::open(&self.dir, stage);
        }
    }
}

/// A stage's own wake-up socket.
#[derive(Debug)]
pub struct WakeListener {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    /// The stage's heartbeat slot (busy, wake-up epoch), when the stage claimed one.
    slot: Option<Heartbeat>,
    /// The wake-up epoch when the stage last woke: commits counted after it may have sent none.
    seen: std::sync::atomic::AtomicU64,
}

impl WakeListener {
    /// Binds the socket of `stage` under `dir`, replacing a stale one left by a dead process.
    pub fn bind(dir: &Path, stage: StageId) -> std::io::Result<WakeListener> {
        std::fs::create_dir_all(dir)?;
        let path = socket_path(dir, stage);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let socket = tokio::net::UnixDatagram::bind(&path)?;
        let slot = Heartbeat::open(dir, stage);
        let seen = slot.as_ref().map_or(0, Heartbeat::wake_epoch).into();
        Ok(WakeListener { socket, path, slot, seen })
    }

    /// Waits for a wake-up, at most `timeout` (forever with `None`). Returns true when woken
    /// (also at once, without sleeping, when a commit was counted since the last wake-up: its
    /// producer may have seen this stage busy and sent nothing). Drains every pending datagram
    /// so a burst of wake-ups costs one pass. The stage is busy from its return until it waits
    /// again.
    pub async fn wait(&self, timeout: Option<Duration>) -> bool {
        use std::sync::atomic::Ordering;
        let mut buf = [0u8; 16];
        let woken = match &self.slot {
            Some(slot) => {
                slot.set_busy(false);
                slot.wake_epoch() != self.seen.load(Ordering::Relaxed)
            }
            None => false,
        };
        let woken = woken
            || match timeout {
                Some(limit) => matches!(tokio::time::timeout(limit, self.socket.recv(&mut buf)).await, Ok(Ok(_))),
                None => self.socket.recv(&mut buf).await.is_ok(),
            };
        if let Some(slot) = &self.slot {
            slot.set_busy(true);
            self.seen.store(slot.wake_epoch(), Ordering::Relaxed);
        }
        while self.socket.try_recv(&mut buf).is_ok() {}
        woken
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn a_busy_stage_is_sent_nothing_and_reads_before_it_sleeps() {
        let dir = tempfile::tempdir().unwrap();
        let _slot = Heartbeat::claim(dir.path(), StageId::LogMirror, Duration::from_secs(60)).unwrap();
        let runtime = runtime();
        let _entered = runtime.enter();
        let listener = WakeListener::bind(dir.path(), StageId::LogMirror).unwrap();
        let waker = Waker::new(dir.path()).unwrap();
        let mut buf = [0u8; 4];
        runtime.block_on(async {
            // Not busy yet: the commit is sent.
            waker.wake(StageId::LogMirror);
            assert!(listener.wait(Some(Duration::from_secs(10))).await);
            // Busy until it waits again: the next commit is only counted.
            waker.wake(StageId::LogMirror);
            assert!(listener.socket.try_recv(&mut buf).is_err(), "a busy stage was sent a wake-up");
            // ...and the wait that follows returns at once for it.
            assert!(listener.wait(Some(Duration::from_secs(10))).await);
            // Nothing new: the wait sleeps (to its timeout here).
            assert!(!listener.wait(Some(Duration::from_millis(20))).await);
        });
    }

    /// Commits racing with the consumer's steps and waits: every one is read without waiting
    /// for a timeout (a lost wake-up would sleep the full ten seconds and fail).
    #[test]
    fn no_commit_is_left_unread_while_the_consumer_sleeps() {
        const COMMITS: u64 = 5_000;
        let dir = tempfile::tempdir().unwrap();
        let _slot = Heartbeat::claim(dir.path(), StageId::Spanmetrics, Duration::from_secs(60)).unwrap();
        let runtime = runtime();
        let _entered = runtime.enter();
        let listener = WakeListener::bind(dir.path(), StageId::Spanmetrics).unwrap();
        let head = Arc::new(AtomicU64::new(0));
        let producer = {
            let (head, dir) = (head.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                let waker = Waker::new(&dir).unwrap();
                for commit in 1..=COMMITS {
                    head.store(commit, Ordering::SeqCst);
                    waker.wake(StageId::Spanmetrics);
                    // Spread over some milliseconds, so commits land in every phase of the
                    // consumer's loop: reading, going to sleep, asleep.
                    if commit % 8 == 0 {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            })
        };
        runtime.block_on(async {
            loop {
                let read = head.load(Ordering::SeqCst);
                if read == COMMITS {
                    break;
                }
                let woken = listener.wait(Some(Duration::from_secs(10))).await;
                assert!(woken, "slept to the timeout with commits after {read} unread");
            }
        });
        producer.join().unwrap();
    }
}
