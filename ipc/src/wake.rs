//! Wake-ups between stage processes: Unix datagram sockets, one per stage, under
//! `<data_dir>/run/<stage>.wake`.
//!
//! A producer that committed to an edge sends one byte to each consuming stage's socket; the
//! consumer blocks on its socket until a wake-up or its next own deadline (decision_wait,
//! batch timeout), so an idle pipeline uses no CPU. A lost wake-up costs latency, never data: a
//! consumer always reads the queue after binding its socket and after every wake-up, and the
//! datagram is only a hint. Sends never block: a full socket buffer already means "wake up".

use std::os::unix::net::UnixDatagram as StdDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    connected: std::sync::Mutex<[Option<StdDatagram>; StageId::ALL.len()]>,
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
        let slot = &mut connected[stage as usize];
        if let Some(socket) = slot.as_ref() {
            match socket.send(&[1]) {
                Ok(_) => return,
                // Buffer full: a wake-up is already pending.
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => *slot = None,
            }
        }
        *slot = self.connect(stage);
        if let Some(socket) = slot.as_ref() {
            let _ignored = socket.send(&[1]);
        }
    }
}

/// A stage's own wake-up socket.
#[derive(Debug)]
pub struct WakeListener {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
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
        Ok(WakeListener { socket, path })
    }

    /// Waits for a wake-up, at most `timeout` (forever with `None`). Returns true when woken.
    /// Drains every pending datagram so a burst of wake-ups costs one pass.
    pub async fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut buf = [0u8; 16];
        let woken = match timeout {
            Some(limit) => matches!(tokio::time::timeout(limit, self.socket.recv(&mut buf)).await, Ok(Ok(_))),
            None => self.socket.recv(&mut buf).await.is_ok(),
        };
        while self.socket.try_recv(&mut buf).is_ok() {}
        woken
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.path);
    }
}
