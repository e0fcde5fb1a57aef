//! The path from a request to a committed batch, shared by the gRPC and HTTP servers.
//!
//! A handler transcodes its request (wire walk -> rkyv batch), queues the encoded batch as a
//! job, and yields once so that other requests already read from the sockets can queue theirs.
//! The first handler to run again commits every queued job in one write transaction (group
//! commit) on the receive runtime's own thread and answers the others. A handler answers its
//! client only after that commit: the ack rule.
//!
//! Committing on the runtime thread (receive runs a single-threaded runtime) avoids a thread
//! hand-off per request: at the reference load the hand-off's context switches cost more than
//! the commit. The price is that the runtime waits while another stage holds LMDB's writer
//! lock (microseconds to a few milliseconds); sockets buffer meanwhile.

use std::sync::{Arc, Mutex};

use tailgate_ipc::batch::{self, MetricBatch};
use tailgate_ipc::wake::Waker;
use tailgate_ipc::{Edge, Queue, QueueError};
use tokio::sync::{mpsc, oneshot};

use crate::events::StageEvents;
use crate::otlp_wire::{self, Signal};

/// Most jobs committed in one transaction.
const MAX_JOBS_PER_COMMIT: usize = 256;

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The payload is malformed (gRPC INVALID_ARGUMENT, HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The queue is at its disk budget (gRPC RESOURCE_EXHAUSTED, HTTP 503 + Retry-After).
    #[error("queue is full; retry later")]
    Full,
    /// The queue failed (gRPC UNAVAILABLE, HTTP 503); the stage is restarting.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

struct Job {
    edge: Edge,
    value: Vec<u8>,
    reply: oneshot::Sender<Result<(), AcceptError>>,
}

/// Handle used by request handlers.
#[derive(Clone)]
pub struct Intake {
    queue: Queue,
    waker: Arc<Waker>,
    events: Arc<StageEvents>,
    waiting: Arc<Mutex<Vec<Job>>>,
    /// Duration attributes of log records (judged on when they carry no trace).
    durations: Arc<Vec<(String, f64)>>,
    /// Reports a queue failure other than "full": the stage must exit and be restarted.
    failures: mpsc::UnboundedSender<QueueError>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").finish_non_exhaustive()
    }
}

impl Intake {
    /// An intake committing to `queue`; queue failures arrive on the returned receiver.
    pub fn new(
        queue: Queue,
        waker: Arc<Waker>,
        events: Arc<StageEvents>,
        durations: Vec<(String, f64)>,
    ) -> (Intake, mpsc::UnboundedReceiver<QueueError>) {
        let (failures, failed) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Vec::new()));
        (Intake { queue, waker, events, waiting, durations: Arc::new(durations), failures }, failed)
    }

    /// Validates, transcodes and durably queues one OTLP request (protobuf bytes). Returns the
    /// number of items accepted once they are committed.
    pub async fn accept(&self, signal: Signal, request: &[u8]) -> Result<u64, AcceptError> {
        let received = crate::context::unix_nanos_now();
        let transcoded = match signal {
            Signal::Traces => otlp_wire::transcode_traces(request, received)
                .and_then(|batch| Ok((Edge::Spans, batch.spans.len() as u64, encode(batch::encode_spans(&batch))?))),
            Signal::Logs => otlp_wire::transcode_logs(request, received, &self.durations)
                .and_then(|batch| Ok((Edge::Logs, batch.logs.len() as u64, encode(batch::encode_logs(&batch))?))),
            Signal::Metrics => otlp_wire::count_metric_points(request).and_then(|points| {
                let batch =
                    MetricBatch { received_unix_nano: received, requests: vec![request.to_vec()], data_points: points };
                Ok((Edge::Metrics, u64::from(points), encode(batch::encode_metrics(&batch))?))
            }),
        };
        let (edge, items, value) = match transcoded {
            Ok(done) => done,
            Err(err) => {
                self.events.error("invalid_request");
                return Err(AcceptError::Invalid(err.to_string()));
            }
        };
        if items == 0 {
            return Ok(0);
        }
        let (reply, answer) = oneshot::channel();
        self.lock_waiting().push(Job { edge, value, reply });
        // Let handlers of requests that are already read queue their jobs too.
        tokio::task::yield_now().await;
        self.commit_waiting();
        let outcome = answer.await.map_err(|_| AcceptError::Unavailable("intake stopped".into()))?;
        match &outcome {
            Ok(()) => {
                self.events.received(items);
                self.events.sent(items);
            }
            Err(AcceptError::Full) => self.events.dropped("refused_queue_full", items),
            Err(_) => self.events.error("queue"),
        }
        outcome.map(|()| items)
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        // A panic while holding this lock cannot leave the Vec inconsistent; keep going.
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commits every waiting job (in chunks of [`MAX_JOBS_PER_COMMIT`]) and answers them.
    fn commit_waiting(&self) {
        loop {
            let jobs: Vec<Job> = {
                let mut waiting = self.lock_waiting();
                let take = waiting.len().min(MAX_JOBS_PER_COMMIT);
                // A client that went away before its commit gets no answer; committing its data
                // would duplicate what it sends again.
                waiting.drain(..take).filter(|job| !job.reply.is_closed()).collect()
            };
            if jobs.is_empty() {
                if self.lock_waiting().is_empty() {
                    return;
                }
                continue;
            }
            let outcome = commit_jobs(&self.queue, &jobs);
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

fn commit_jobs(queue: &Queue, jobs: &[Job]) -> Result<(), QueueError> {
    let mut wtxn = queue.write()?;
    let incoming: usize = jobs.iter().map(|job| job.value.len()).sum();
    if !queue.admits_bytes(&wtxn, incoming as u64)? {
        return Err(QueueError::Full);
    }
    for job in jobs {
        queue.append(&mut wtxn, job.edge, &job.value)?;
    }
    queue.commit(wtxn)
}
