//! What every stage gets from its process: configuration, the queue, wake-ups and the shutdown
//! signal. Stages read no globals; everything comes in through [`StageContext`].

use std::sync::Arc;
use std::time::Duration;

use tailgate_config::Config;
use tailgate_ipc::heartbeat::{BEAT_INTERVAL, Heartbeat};
use tailgate_ipc::memory;
use tailgate_ipc::wake::{WakeListener, Waker};
use tailgate_ipc::{Queue, QueueError, StageId};
use tokio::sync::watch;

use crate::events::StageEvents;
use crate::limits::REBUILD_ALLOWANCE;

/// A stage failed; the process exits non-zero and the supervisor restarts it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The queue failed in a way the stage cannot work around.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// A socket could not be bound or another I/O failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A stored batch could not be read.
    #[error("batch: {0}")]
    Batch(#[from] tailgate_ipc::batch::BatchError),
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

/// Everything a stage needs, handed in by the stage process's entry point.
pub struct StageContext {
    /// Which stage this process runs.
    pub stage: StageId,
    /// The validated configuration (the same file every process reads).
    pub config: Arc<Config>,
    /// The shared queue.
    pub queue: Queue,
    /// Sends wake-ups to downstream stages after commits.
    pub waker: Arc<Waker>,
    /// This stage's own wake-up socket.
    pub wake: WakeListener,
    /// Flips to `true` when the stage must drain and exit.
    pub shutdown: watch::Receiver<bool>,
    /// Counters every stage emits alike.
    pub events: Arc<StageEvents>,
    /// This process's heartbeat slot, read by the supervisor ([`tailgate_ipc::heartbeat`]).
    pub heartbeat: Arc<Heartbeat>,
}

/// Ends a shed: returns free heap to the system (the test-only ballast first) and logs what was
/// shed with the private memory before (`before`, read when the request was taken) and after.
pub fn shed_done(before: Option<u64>, what: &str) {
    crate::fault::release_ballast();
    memory::release_free_heap();
    let mib = |bytes: Option<u64>| bytes.map_or(-1.0, |b| b as f64 / (1024.0 * 1024.0));
    tracing::info!(
        shed = what,
        private_mib_before = format!("{:.1}", mib(before)),
        private_mib_after = format!("{:.1}", mib(memory::private_bytes())),
        "shed memory on the supervisor's request (over the soft budget)"
    );
}

/// Stops the heartbeat task of [`StageContext::beat_while_runtime_runs`] when dropped.
#[derive(Debug)]
pub struct BeatGuard(tokio::task::JoinHandle<()>);

impl Drop for BeatGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext").field("stage", &self.stage).finish_non_exhaustive()
    }
}

impl StageContext {
    /// Whether shutdown was requested.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Stamps the heartbeat at the head of a step: the stage promises to stamp again (at its
    /// next step or while it waits) within the supervisor's liveness timeout.
    pub fn beat(&self) {
        self.heartbeat.beat();
        self.events.publish(&self.heartbeat);
    }

    /// For stages whose work runs in many tasks, each bounded by its own timeouts (receive's
    /// servers, export's destinations): renews the heartbeat every beat interval from a
    /// task of the stage's runtime until the guard is dropped. The stamps stop when the runtime
    /// is blocked (a thread stuck in a system call or a lock, an endless loop) or the process
    /// hangs; stepping stages stamp from their loop instead, which also catches an await that
    /// never completes.
    pub fn beat_while_runtime_runs(&self) -> BeatGuard {
        let heartbeat = self.heartbeat.clone();
        let events = self.events.clone();
        let interval = self.beat_interval();
        BeatGuard(tokio::spawn(async move {
            loop {
                heartbeat.beat_within(interval);
                events.publish(&heartbeat);
                if heartbeat.take_shed_request() {
                    // These stages hold no index to shrink: what they can give back is free heap.
                    shed_done(memory::private_bytes(), "free heap returned");
                }
                tokio::time::sleep(interval).await;
            }
        }))
    }

    /// How often a waiting stage renews its heartbeat: half the supervisor's liveness timeout,
    /// at least [`BEAT_INTERVAL`] (an idle stage wakes only for this).
    pub fn beat_interval(&self) -> Duration {
        (self.config.supervisor.liveness_timeout / 2).max(BEAT_INTERVAL)
    }

    /// Whether the supervisor asked this stage to shed memory (it is over its soft budget); the
    /// request counts as handled. The stage then sheds and calls [`shed_done`].
    pub fn take_shed_request(&self) -> bool {
        self.heartbeat.take_shed_request()
    }

    /// Stamps the heartbeat before rebuilding the stage's index from the queue (after a failed
    /// step), which may read a large backlog before the next step.
    pub fn rebuilding(&self) {
        self.heartbeat.beat_within(REBUILD_ALLOWANCE);
    }

    /// Sleeps until a wake-up, `timeout`, or shutdown, whichever comes first, renewing the
    /// heartbeat every beat interval while it waits.
    pub async fn idle(&mut self, timeout: Option<Duration>) {
        let mut shutdown = self.shutdown.clone();
        let woken = self.wake.wait(timeout);
        tokio::pin!(woken);
        let interval = self.beat_interval();
        loop {
            self.heartbeat.beat_within(interval);
            self.events.publish(&self.heartbeat);
            // A shed request ends the wait: the stage's loop handles it.
            if self.heartbeat.shed_requested() {
                break;
            }
            tokio::select! {
                _ = &mut woken => break,
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        self.heartbeat.beat();
    }

    /// Like [`StageContext::idle`], then keeps steps at least `min_interval` apart (counted from
    /// `last_step`), so wake-ups arriving in a burst are handled by one step. Stages whose
    /// output waits seconds anyway (sampling, log correlation) trade a little latency for far
    /// fewer transactions at low rates.
    pub async fn idle_paced(
        &mut self,
        timeout: Option<Duration>,
        last_step: std::time::Instant,
        min_interval: Duration,
    ) {
        self.idle(timeout).await;
        let rest = min_interval.saturating_sub(last_step.elapsed());
        if rest.is_zero() {
            return;
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(rest) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
}

impl StageContext {
    /// The queue is above the stage threshold: waits (a wake-up or one second) for export to
    /// free space, logging once per episode. `waiting` tracks the episode.
    pub async fn wait_for_budget(&mut self, waiting: &mut bool) {
        if !*waiting {
            tracing::warn!(stage = %self.stage, "queue near its disk budget; waiting for export to free space");
            *waiting = true;
        }
        self.events.error("budget_wait");
        self.idle(Some(Duration::from_secs(1))).await;
    }

    /// A step went through: ends a waiting episode.
    pub fn budget_resumed(&self, waiting: &mut bool) {
        if std::mem::take(waiting) {
            tracing::info!(stage = %self.stage, "queue below its stage threshold again; resuming");
        }
    }
}

/// Handles a failed step: a full queue is a state downstream stages resolve by consuming, so
/// the stage waits (backing off from 10 ms to 1 s, counted in `full_streak`) and returns `Ok`
/// for the caller to retry; any other error is returned and ends the stage.
pub async fn wait_if_full(ctx: &StageContext, error: StageError, full_streak: &mut u32) -> Result<(), StageError> {
    if !matches!(error, StageError::Queue(QueueError::Full)) {
        return Err(error);
    }
    ctx.events.error("queue_full");
    if *full_streak == 0 {
        tracing::warn!(stage = %ctx.stage, "queue is at its disk budget; waiting for downstream stages to free space");
    }
    let delay = Duration::from_millis(10).saturating_mul(1 << (*full_streak).min(7)).min(Duration::from_secs(1));
    *full_streak += 1;
    let mut shutdown = ctx.shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    Ok(())
}
