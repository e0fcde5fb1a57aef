//! The path from a request to a committed batch, shared by the gRPC and HTTP servers.
//!
//! Handlers transcode the request on their own task (wire walk -> rkyv batch), then hand the
//! encoded batch to one writer thread that owns every write transaction of this process. The
//! writer takes whatever jobs are waiting and commits them together (group commit), then
//! answers each handler. A handler answers its client only after that commit: the ack rule.

use std::sync::Arc;

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
    jobs: mpsc::Sender<Job>,
    events: Arc<StageEvents>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").finish_non_exhaustive()
    }
}

impl Intake {
    /// Starts the writer thread. It ends when every [`Intake`] clone is dropped; join the handle
    /// to learn whether it failed.
    pub fn start(
        queue: Queue,
        waker: Arc<Waker>,
        events: Arc<StageEvents>,
    ) -> std::io::Result<(Intake, std::thread::JoinHandle<Result<(), QueueError>>)> {
        let (jobs, receiver) = mpsc::channel(1024);
        let writer = std::thread::Builder::new()
            .name("intake-writer".into())
            .spawn(move || write_loop(&queue, &waker, receiver))?;
        Ok((Intake { jobs, events }, writer))
    }

    /// Validates, transcodes and durably queues one OTLP request (protobuf bytes). Returns the
    /// number of items accepted once they are committed.
    pub async fn accept(&self, signal: Signal, request: &[u8]) -> Result<u64, AcceptError> {
        let received = crate::context::unix_nanos_now();
        let transcoded = match signal {
            Signal::Traces => otlp_wire::transcode_traces(request, received)
                .and_then(|batch| Ok((Edge::Spans, batch.spans.len() as u64, encode(batch::encode_spans(&batch))?))),
            Signal::Logs => otlp_wire::transcode_logs(request, received)
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
        self.jobs
            .send(Job { edge, value, reply })
            .await
            .map_err(|_| AcceptError::Unavailable("intake writer stopped".into()))?;
        let outcome = answer.await.map_err(|_| AcceptError::Unavailable("intake writer stopped".into()))?;
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
}

fn encode(result: Result<Vec<u8>, batch::BatchError>) -> Result<Vec<u8>, otlp_wire::WireError> {
    // Encoding an owned batch fails only past u32::MAX items; report it as a bad request.
    result.map_err(|err| otlp_wire::WireError::Other(err.to_string()))
}

fn write_loop(queue: &Queue, waker: &Waker, mut receiver: mpsc::Receiver<Job>) -> Result<(), QueueError> {
    let mut jobs = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    while let Some(first) = receiver.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let outcome = commit_jobs(queue, &jobs);
        let answer = match &outcome {
            Ok(()) => Ok(()),
            Err(QueueError::Full) => Err(AcceptError::Full),
            Err(err) => Err(AcceptError::Unavailable(err.to_string())),
        };
        let mut written = [false; 5];
        for job in jobs.drain(..) {
            written[job.edge as usize] = true;
            let _client_gone = job.reply.send(answer.clone());
        }
        match outcome {
            Ok(()) => {
                for edge in Edge::ALL {
                    if written[edge as usize] {
                        waker.edge_written(edge);
                    }
                }
            }
            Err(QueueError::Full) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn commit_jobs(queue: &Queue, jobs: &[Job]) -> Result<(), QueueError> {
    let mut wtxn = queue.write()?;
    if !queue.admits(&wtxn)? {
        return Err(QueueError::Full);
    }
    for job in jobs {
        queue.append(&mut wtxn, job.edge, &job.value)?;
    }
    queue.commit(wtxn)
}
