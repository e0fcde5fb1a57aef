//! The service manager's notification protocol (`sd_notify(3)`): datagrams of `KEY=VALUE` lines
//! to the socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
//!
//! What the supervisor says, and when:
//! - `READY=1` once every stage is running and has stamped its heartbeat from its work (past its
//!   startup; receive: listening), not while any stage is down, and again after a reload;
//! - `STATUS=` a one-line summary of stages and backlog, whenever it changes;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, only while the supervisor actor answers and the
//!   queue is readable: a hung supervisor stops pinging and the manager restarts the service;
//! - `RELOADING=1` (with `MONOTONIC_USEC`) when a SIGHUP reload starts, `STOPPING=1` when a
//!   shutdown starts.
//!
//! Without `NOTIFY_SOCKET` nothing is sent. The variables are read once at start and not passed
//! on to stage processes (only the main process speaks for the service).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Environment variables of the protocol (removed from the stages' environment).
pub const NOTIFY_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    /// Ping interval (half the manager's watchdog timeout), if the watchdog is on for us.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier the environment asks for, if any.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let socket = UnixDatagram::unbound().ok()?;
        let connected = match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|addr| socket.connect_addr(&addr))
            }
            None => socket.connect(&path),
        };
        if let Err(err) = connected {
            tracing::warn!(error = %err, "NOTIFY_SOCKET is set but cannot be reached; not notifying");
            return None;
        }
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(|usec| Duration::from_micros(usec / 2));
        Some(Notifier { socket, watchdog })
    }

    /// Sends one message (lines of `KEY=VALUE`); a failure is logged, never fatal.
    pub fn send(&self, message: &str) {
        if let Err(err) = self.socket.send(message.as_bytes()) {
            tracing::debug!(error = %err, "service manager notification not sent");
        }
    }

    /// `RELOADING=1` with the monotonic time the manager expects alongside.
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

/// The `STATUS=` line: stages up, and the backlog.
pub fn status_line(snapshot: &crate::telemetry::Snapshot) -> String {
    let (up, total) = snapshot.stages_up();
    let (batches, bytes, oldest) = snapshot.backlog();
    let mut line = format!("{up}/{total} stages up; backlog {batches} batches, {:.1} MB", bytes as f64 / 1e6);
    if oldest >= 1.0 {
        line.push_str(&format!(", oldest {oldest:.0} s"));
    }
    if !snapshot.intake_open() {
        line.push_str("; intake refused (disk budget)");
    }
    line
}
