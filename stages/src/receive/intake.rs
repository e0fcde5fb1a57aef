//! The path from a request to a committed batch, shared by the gRPC and HTTP servers.
//!
//! A handler transcodes its request (wire walk -> rkyv batch) and queues the encoded batch as a
//! job for receive's committer thread, which commits every job queued meanwhile in one write
//! transaction (group commit) and answers each. A handler answers its client only after that
//! commit: the ack rule.
//!
//! Why a thread of its own: LMDB's writer lock has no timeout. A stage frozen inside a write
//! transaction (SIGSTOP, a frozen cgroup, an I/O stall) would block whatever thread waits for the
//! lock; on receive's runtime thread that would stop every connection from being answered. The
//! committer blocks instead, and a handler whose job is not committing within
//! `queue.write_timeout` answers a retryable refusal (RESOURCE_EXHAUSTED with RetryInfo / 503
//! with Retry-After). Abandon-or-commit: each job has a state the handler and the committer
//! race for with one compare-and-swap: either the handler abandons it (the committer then
//! skips it, so a client that retries never finds its data committed twice) or the committer
//! claims it once it holds the lock (the handler then waits for the commit, which is moments
//! away). The hand-off costs one wake-up per group commit, not per request.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tailgate_ipc::batch::{self, MetricBatch};
use tailgate_ipc::wake::Waker;
use tailgate_ipc::{Edge, Queue, QueueError};
use tokio::sync::{mpsc, oneshot};

use crate::events::StageEvents;
use crate::otlp_wire::{self, Signal};

/// Most jobs committed in one transaction.
const MAX_JOBS_PER_COMMIT: usize = 256;

const PENDING: u8 = 0;
const COMMITTING: u8 = 1;
const ABANDONED: u8 = 2;

/// What an accepted request left in the queue, and what of it was refused item by item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Items committed.
    pub items: u64,
    /// Items refused alone (invalid ids): the answer is an OTLP partial success.
    pub rejected: otlp_wire::Rejected,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The payload is malformed (gRPC INVALID_ARGUMENT, HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The queue is at its disk budget (gRPC RESOURCE_EXHAUSTED, HTTP 503 + Retry-After).
    #[error("queue is full; retry later")]
    Full,
    /// The queue could not be written in time: another stage holds it (gRPC
    /// RESOURCE_EXHAUSTED, HTTP 503 + Retry-After). Nothing of the request was stored.
    #[error("queue is busy (its writer lock is held); retry later")]
    Busy,
    /// tailgate is draining for a stop (gRPC UNAVAILABLE, HTTP 503 + Retry-After): send to
    /// another instance or retry after the restart.
    #[error("tailgate is draining; retry later")]
    Draining,
    /// The queue failed (gRPC UNAVAILABLE, HTTP 503); the stage is restarting.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

struct Job {
    edge: Edge,
    value: Vec<u8>,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<(), AcceptError>>,
}

/// What the handlers and the committer thread share.
struct Shared {
    waiting: Mutex<Vec<Job>>,
    ready: Condvar,
    closed: AtomicBool,
}

impl Shared {
    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        // A panic while holding this lock cannot leave the Vec inconsistent; keep going.
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Stops the committer once the last handle is gone.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        let _guard = self.0.lock_waiting();
        self.0.ready.notify_all();
    }
}

/// Handle used by request handlers.
#[derive(Clone)]
pub struct Intake {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
    events: Arc<StageEvents>,
    /// Duration attributes of log records (judged on when they carry no trace).
    durations: Arc<Vec<(String, f64)>>,
    write_timeout: Duration,
    /// The stage's slot: intake is refused while the supervisor has paused it (a drain).
    slot: Option<Arc<tailgate_ipc::heartbeat::Heartbeat>>,
    /// Per-item caps (`receivers.otlp.limits`).
    limits: otlp_wire::Limits,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").finish_non_exhaustive()
    }
}

impl Intake {
    /// An intake committing to `queue` on its own thread; queue failures arrive on the returned
    /// receiver.
    pub fn new(
        queue: Queue,
        waker: Arc<Waker>,
        events: Arc<StageEvents>,
        durations: Vec<(String, f64)>,
        write_timeout: Duration,
    ) -> Result<(Intake, mpsc::UnboundedReceiver<QueueError>), std::io::Error> {
        let (failures, failed) = mpsc::unbounded_channel();
        let shared =
            Arc::new(Shared { waiting: Mutex::new(Vec::new()), ready: Condvar::new(), closed: AtomicBool::new(false) });
        let committer = Committer { shared: shared.clone(), queue, waker, failures };
        std::thread::Builder::new().name("tg-receive-commit".into()).spawn(move || committer.run())?;
        let closer = Arc::new(Closer(shared.clone()));
        Ok((
            Intake {
                shared,
                _closer: closer,
                events,
                durations: Arc::new(durations),
                write_timeout,
                slot: None,
                limits: otlp_wire::Limits::NONE,
            },
            failed,
        ))
    }

    /// Cuts spans and log records down to `limits` as they are accepted.
    pub fn with_limits(mut self, limits: otlp_wire::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses requests while the supervisor pauses intake in `slot` (a drain).
    pub fn pause_with(&mut self, slot: Arc<tailgate_ipc::heartbeat::Heartbeat>) {
        self.slot = Some(slot);
    }

    /// Validates, transcodes and durably queues one OTLP request (protobuf bytes). Answers once
    /// the accepted items are committed, with the items refused one by one.
    pub async fn accept(&self, signal: Signal, request: &[u8]) -> Result<Accepted, AcceptError> {
        if self.slot.as_ref().is_some_and(|slot| slot.intake_paused()) {
            return Err(AcceptError::Draining);
        }
        let received = tailgate_ipc::clock::pipeline_now();
        let transcoded = match signal {
            Signal::Traces => otlp_wire::transcode_traces(request, received, &self.limits).and_then(|t| {
                let value = encode(batch::encode_spans(&t.batch))?;
                Ok((Edge::Spans, t.batch.spans.len() as u64, t.rejected, t.truncated, value))
            }),
            Signal::Logs => otlp_wire::transcode_logs(request, received, &self.durations, &self.limits).and_then(|t| {
                let value = encode(batch::encode_logs(&t.batch))?;
                Ok((Edge::Logs, t.batch.logs.len() as u64, t.rejected, t.truncated, value))
            }),
            Signal::Metrics => otlp_wire::count_metric_points(request).and_then(|points| {
                let batch =
                    MetricBatch { received_unix_nano: received, requests: vec![request.to_vec()], data_points: points };
                let value = encode(batch::encode_metrics(&batch))?;
                Ok((
                    Edge::Metrics,
                    u64::from(points),
                    otlp_wire::Rejected::default(),
                    otlp_wire::Truncated::default(),
                    value,
                ))
            }),
        };
        let (edge, items, rejected, truncated, value) = match transcoded {
            Ok(done) => done,
            Err(err) => {
                self.events.error("invalid_request");
                return Err(AcceptError::Invalid(err.to_string()));
            }
        };
        if truncated.any() {
            self.count_truncated(&truncated);
        }
        if rejected.count > 0 {
            self.events.dropped("invalid_item", rejected.count);
        }
        if items == 0 {
            return Ok(Accepted { items, rejected });
        }
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(PENDING));
        {
            let mut waiting = self.shared.lock_waiting();
            waiting.push(Job { edge, value, state: state.clone(), reply });
            if waiting.len() == 1 {
                self.shared.ready.notify_one();
            }
        }
        let outcome = match tokio::time::timeout(self.write_timeout, &mut answer).await {
            Ok(answered) => answered.map_err(|_| AcceptError::Unavailable("intake stopped".into()))?,
            // Not claimed by a commit in time: abandon it, unless the committer just claimed it.
            Err(_) if state.compare_exchange(PENDING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst).is_ok() => {
                Err(AcceptError::Busy)
            }
            Err(_) => answer.await.map_err(|_| AcceptError::Unavailable("intake stopped".into()))?,
        };
        match &outcome {
            Ok(()) => {
                self.events.received(items);
                self.events.sent(items);
            }
            Err(AcceptError::Full) => self.events.dropped("refused_queue_full", items),
            Err(AcceptError::Busy) => self.events.dropped("refused_queue_busy", items),
            Err(_) => self.events.error("queue"),
        }
        outcome.map(|()| Accepted { items, rejected })
    }
}

impl Intake {
    /// Counts a request refused for missing or wrong credentials.
    pub fn refused_unauthenticated(&self) {
        self.events.error("unauthenticated");
    }

    /// Counts what the caps cut (`tailgate_errors_total{stage="receive",kind=...}`). Counted
    /// when cut, whether or not the request is then committed: a refused request is sent again
    /// and cut again, so the counts say how often clients exceed the caps.
    #[cold]
    fn count_truncated(&self, truncated: &otlp_wire::Truncated) {
        for (kind, n) in [
            ("attributes_dropped", truncated.attributes),
            ("attribute_values_truncated", truncated.values),
            ("span_events_dropped", truncated.events),
            ("span_links_dropped", truncated.links),
        ] {
            if n > 0 {
                self.events.errors(kind, n);
            }
        }
    }
}

/// The thread that takes the writer lock so the runtime never waits for it.
struct Committer {
    shared: Arc<Shared>,
    queue: Queue,
    waker: Arc<Waker>,
    /// Reports a queue failure other than "full": the stage must exit and be restarted.
    failures: mpsc::UnboundedSender<QueueError>,
}

impl Committer {
    fn run(self) {
        loop {
            let jobs: Vec<Job> = {
                let mut waiting = self.shared.lock_waiting();
                while waiting.is_empty() {
                    if self.shared.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    waiting = self.shared.ready.wait(waiting).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                let take = waiting.len().min(MAX_JOBS_PER_COMMIT);
                // A client that went away before its commit gets no answer; committing its data
                // would duplicate what it sends again.
                waiting.drain(..take).filter(|job| !job.reply.is_closed()).collect()
            };
            if jobs.is_empty() {
                continue;
            }
            let (outcome, jobs) = commit_jobs(&self.queue, jobs);
            let answer = match &outcome {
                Ok(()) => Ok(()),
                Err(QueueError::Full) => Err(AcceptError::Full),
                Err(err) => Err(AcceptError::Unavailable(err.to_string())),
            };
            let mut written = [false; Edge::ALL.len()];
            for job in jobs {
                written[job.edge as usize] = true;
                let _client_gone = job.reply.send(answer.clone());
            }
            match outcome {
                Ok(()) => {
                    for edge in Edge::ALL {
                        if written[edge as usize] {
                            self.waker.edge_written(edge);
                        }
                    }
                }
                Err(QueueError::Full) => {}
                Err(err) => {
                    let _stage_stopping = self.failures.send(err);
                }
            }
        }
    }
}

fn encode(result: Result<Vec<u8>, batch::BatchError>) -> Result<Vec<u8>, otlp_wire::WireError> {
    // Encoding an owned batch fails only past u32::MAX items; report it as a bad request.
    result.map_err(|err| otlp_wire::WireError::Other(err.to_string()))
}

/// Takes the writer lock, claims the jobs not abandoned meanwhile, and commits them. Returns
/// the outcome and the claimed jobs (the ones to answer).
fn commit_jobs(queue: &Queue, jobs: Vec<Job>) -> (Result<(), QueueError>, Vec<Job>) {
    let mut wtxn = match queue.write() {
        Ok(wtxn) => wtxn,
        Err(err) => return (Err(err), jobs),
    };
    let jobs: Vec<Job> = jobs
        .into_iter()
        .filter(|job| job.state.compare_exchange(PENDING, COMMITTING, Ordering::SeqCst, Ordering::SeqCst).is_ok())
        .collect();
    if jobs.is_empty() {
        return (Ok(()), jobs);
    }
    let outcome = (|| {
        let incoming: usize = jobs.iter().map(|job| job.value.len()).sum();
        if !queue.admits_bytes(&wtxn, incoming as u64)? {
            return Err(QueueError::Full);
        }
        for job in &jobs {
            queue.append(&mut wtxn, job.edge, &job.value)?;
        }
        queue.commit(wtxn)
    })();
    (outcome, jobs)
}
