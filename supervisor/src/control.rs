//! The supervisor's control socket: `<data_dir>/run/control.sock`, a local (Unix stream) socket
//! of mode 0600, so only the user tailgate runs as (and root) can use it. One JSON request per
//! line, one JSON answer per line, then the connection closes:
//!
//! - `{"command":"status"}` → `{"stages":[{stage, pid, state, uptime_seconds, private_bytes,
//!   pss_bytes, cpu_seconds, restarts:{reason: n}, restarts_in_window, heartbeat_overdue_ms}]}`
//! - `{"command":"restart-stage","stage":"tail_sample"}` → `{"restarted":"tail_sample","pid":N}`:
//!   the stage drains (SIGTERM) and starts again at once; an operator's restart does not count
//!   towards escalation.
//!
//! - `{"command":"reload"}` → `{"reloaded":true,"restarted":["tail_sample",...]}`: the file is
//!   validated first; with a problem nothing changes and the answer is the error.
//!
//! - `{"command":"shed","stage":"tail_sample"}` (or no stage: all) → `{"shed":["tail_sample"]}`
//! - `{"command":"shutdown"}` → `{"stopping":true}`, then the ordered shutdown SIGTERM starts.
//! - `{"command":"drain","timeout_seconds":60}` → `{"drained":true,"remaining":{}}` once every
//!   edge is empty (or `false` and what remains, per edge, at the timeout); intake is paused
//!   from the request on. `{"command":"resume"}` → `{"resumed":true}`.
//!
//! Any failure is `{"error":"..."}`. The CLI (`tailgate status`, `tailgate restart-stage`) is the
//! client; while no supervisor answers, `status` still reads the queue on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use interprocess::local_socket::tokio::{Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 4096;

/// How long a client waits for the supervisor's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Every stage's process and health.
    Status,
    /// Validate the operator's configuration file and apply it: restart the stages whose
    /// configuration changed.
    Reload,
    /// Ask one stage (or every stage) to shed memory now, as over its soft budget.
    Shed {
        /// Stage name; every stage when absent.
        stage: Option<String>,
    },
    /// Stop tailgate as SIGTERM does: stages drain in order, the supervisor exits 0.
    Shutdown,
    /// Pause intake (receivers answer UNAVAILABLE / 503 with a retry hint, files wait) and wait
    /// until every queue edge is empty or `timeout_seconds` (default 60) pass. Intake stays
    /// paused until `resume` (or a restart of tailgate).
    Drain {
        /// How long to wait for the queue to empty.
        timeout_seconds: Option<u64>,
    },
    /// Resume intake after a drain.
    Resume,
    /// Drain and restart one stage.
    RestartStage {
        /// Stage name (receive, tail_sample, log_mirror, spanmetrics, export).
        stage: String,
    },
}

/// The socket's path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    tailgate_ipc::wake::socket_dir(data_dir).join("control.sock")
}

/// Answers one request (the supervisor actor, in the running process).
pub type Handler =
    std::sync::Arc<dyn Fn(Request) -> std::pin::Pin<Box<dyn Future<Output = serde_json::Value> + Send>> + Send + Sync>;

/// Binds the socket (replacing one left by a dead supervisor: the caller holds the data
/// directory) and answers requests with `handler` until the process ends.
pub fn serve(data_dir: &Path, handler: Handler) -> std::io::Result<()> {
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let name = path.as_path().to_fs_name::<GenericFilePath>()?;
    // Created with mode 0600 under a umask-proof chmod right after (no window: the directory
    // is the data directory's `run/`, which only the service user writes).
    let listener = ListenerOptions::new().name(name).create_tokio()?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(err) = answer(conn, handler).await {
                            tracing::debug!(error = %err, "control connection failed");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(conn: Stream, handler: Handler) -> std::io::Result<()> {
    let mut line = String::new();
    let mut reader = BufReader::new(&conn).take(MAX_REQUEST_BYTES);
    tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => handler(request).await,
        Err(err) => serde_json::json!({ "error": format!("bad request: {err}") }),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    let mut send = &conn;
    send.write_all(&out).await?;
    send.flush().await
}

/// Sends `request` to the supervisor of `data_dir` and returns its answer (an `{"error":..}`
/// answer becomes an error).
pub fn ask(data_dir: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    ask_within(data_dir, request, ANSWER_TIMEOUT)
}

/// Like [`ask`], waiting up to `timeout` for the answer (a drain takes as long as it takes).
pub fn ask_within(data_dir: &Path, request: &Request, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let path = socket_path(data_dir);
    let reply = runtime.block_on(async {
        tokio::time::timeout(timeout, async {
            let name = path.as_path().to_fs_name::<GenericFilePath>()?;
            let conn = Stream::connect(name).await?;
            let mut out = serde_json::to_vec(request)?;
            out.push(b'\n');
            let mut send = &conn;
            send.write_all(&out).await?;
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).await?;
            anyhow::Ok(serde_json::from_str::<serde_json::Value>(&line)?)
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
    });
    let reply = reply.map_err(|err| anyhow::anyhow!("no supervisor answers on {}: {err}", path.display()))?;
    if let Some(message) = reply.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{message}");
    }
    Ok(reply)
}
