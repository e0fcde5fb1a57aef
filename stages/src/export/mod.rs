//! export: one consumer per destination, each reading its edge with its own cursor, so the
//! edge's depth is that destination's true backlog.
//!
//! Ack rule: a queue batch leaves the queue only when the backend acknowledged the request that
//! carried it, or when the backend refused it permanently (counted as dropped with a reason).
//! The boundary to the backend is at-least-once: a request sent but not yet committed is sent
//! again after a kill.
//!
//! Batching follows the Collector's batch processor: a request goes out once `send_batch_size`
//! items are waiting or `timeout` after the consumer first saw a waiting item. Waiting items are
//! counted from batch headers; the request is assembled only when it is sent. A request carries whole queue
//! batches, so it may exceed `send_batch_size` (which is a trigger, not a cap).

pub mod otlp;

use bytes::Bytes;
use tailgate_config::Destination;
use tailgate_ipc::batch;
use tailgate_ipc::{Consumer, Edge, Queue};

use crate::context::{StageContext, StageError};
use crate::otlp_wire::{self, Signal};
use otlp::{OtlpClient, SendOutcome};

/// Most queue batches read into one request.
const MAX_BATCHES_PER_REQUEST: usize = 256;
/// A request stops growing at this size (after its first batch), below the 4 MiB message limit
/// gRPC servers apply by default. Stage outputs are sealed at 1 MiB, so a request holds at least
/// one whole batch.
const MAX_REQUEST_BYTES: usize = 3 << 20;

/// A request assembled from queue batches.
#[derive(Debug, Default)]
pub struct Assembled {
    /// The encoded `Export*ServiceRequest`.
    pub request: Vec<u8>,
    /// Items it carries.
    pub items: u64,
    /// Last queue sequence number it includes.
    pub last_seq: u64,
}

/// Reads batches after the consumer's cursor into one request, stopping once `max_items` are in.
pub fn assemble(queue: &Queue, consumer: Consumer, max_items: u64) -> Result<(u64, Assembled), StageError> {
    let rtxn = queue.read()?;
    let cursor = queue.cursor(&rtxn, consumer)?;
    let mut out = Assembled { last_seq: cursor, ..Assembled::default() };
    for (taken, entry) in queue.entries_after(&rtxn, consumer.edge(), cursor)?.enumerate() {
        if taken == MAX_BATCHES_PER_REQUEST || out.items >= max_items || out.request.len() >= MAX_REQUEST_BYTES {
            break;
        }
        let (seq, value) = entry?;
        if taken > 0 && out.request.len() + value.len() > MAX_REQUEST_BYTES {
            break;
        }
        match consumer.edge() {
            Edge::KeptSpans | Edge::Spans => {
                let source = batch::access_spans(value)?;
                let items = source.spans.iter().map(|span| (span.scope.to_native(), span.body.as_slice()));
                write_groups(&mut out.request, &source.resources, &source.scopes, items);
                out.items += source.spans.len() as u64;
            }
            Edge::KeptLogs | Edge::Logs => {
                let source = batch::access_logs(value)?;
                let items = source.logs.iter().map(|log| (log.scope.to_native(), log.body.as_slice()));
                write_groups(&mut out.request, &source.resources, &source.scopes, items);
                out.items += source.logs.len() as u64;
            }
            Edge::Metrics => {
                let source = batch::access_metrics(value)?;
                // Concatenated encodings of one message type merge their repeated fields.
                for request in source.requests.iter() {
                    out.request.extend_from_slice(request.as_slice());
                }
                out.items += u64::from(source.data_points.to_native());
            }
        }
        out.last_seq = seq;
    }
    Ok((cursor, out))
}

/// Writes one `ResourceSpans` / `ResourceLogs` entry per scope of a stored batch, holding the
/// items (scope index, encoded body) of that scope in their stored order.
fn write_groups<'a>(
    out: &mut Vec<u8>,
    resources: &rkyv::vec::ArchivedVec<batch::ArchivedResourceBlock>,
    scopes: &rkyv::vec::ArchivedVec<batch::ArchivedScopeBlock>,
    items: impl Iterator<Item = (u32, &'a [u8])> + Clone,
) {
    for (scope_index, scope) in scopes.iter().enumerate() {
        let (resource_bytes, resource_schema) = resources
            .get(scope.resource.to_native() as usize)
            .map(|r| (r.resource.as_slice(), r.schema_url.as_str()))
            .unwrap_or((&[], ""));
        let mut bodies = items.clone().filter(|(scope, _)| *scope as usize == scope_index).map(|(_, body)| body);
        otlp_wire::encode_resource_group(
            out,
            resource_bytes,
            resource_schema,
            scope.scope.as_slice(),
            scope.schema_url.as_str(),
            &mut bodies,
        );
    }
}

/// Moves the consumer's cursor past what was delivered (or permanently refused).
fn commit(queue: &Queue, consumer: Consumer, from: u64, to: u64) -> Result<(), StageError> {
    let mut wtxn = queue.write()?;
    queue.advance(&mut wtxn, consumer, from, to)?;
    queue.commit(wtxn)?;
    Ok(())
}

struct Target {
    consumer: Consumer,
    client: Option<OtlpClient>,
}

/// Items waiting after the consumer's cursor, counted from batch headers only (no archive
/// access), up to where a request would stop.
fn pending_items(queue: &Queue, consumer: Consumer, max_items: u64) -> Result<u64, StageError> {
    let rtxn = queue.read()?;
    let cursor = queue.cursor(&rtxn, consumer)?;
    let mut items = 0;
    for (taken, entry) in queue.entries_after(&rtxn, consumer.edge(), cursor)?.enumerate() {
        if taken == MAX_BATCHES_PER_REQUEST || items >= max_items {
            break;
        }
        let (_, value) = entry?;
        // A batch counts even when empty: it still has to be consumed.
        items += u64::from(batch::BatchHeader::parse(value)?.items).max(1);
    }
    Ok(items)
}

/// Runs one consumer until shutdown.
async fn run_consumer(
    ctx: &StageContext,
    target: Target,
    mut wake: tokio::sync::watch::Receiver<u64>,
) -> Result<(), StageError> {
    let exporters = &ctx.config.exporters;
    let batch_size = u64::from(exporters.batch.send_batch_size);
    let batch_timeout = exporters.batch.timeout;
    let retry = &exporters.retry_on_failure;
    let consumer = target.consumer;
    // When this consumer first saw the items it is now waiting to send (the batch timer).
    let mut waiting_since: Option<std::time::Instant> = None;
    loop {
        if ctx.stopping() {
            return Ok(());
        }
        let items = pending_items(&ctx.queue, consumer, batch_size)?;
        if items == 0 {
            waiting_since = None;
            let mut stop = ctx.shutdown.clone();
            tokio::select! {
                _ = wake.changed() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            continue;
        }
        let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
        let age = since.elapsed();
        if items < batch_size && age < batch_timeout {
            let mut stop = ctx.shutdown.clone();
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(batch_timeout - age) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            continue;
        }
        waiting_since = None;
        let (cursor, assembled) = assemble(&ctx.queue, consumer, batch_size)?;
        let Some(client) = &target.client else {
            ctx.events.dropped("no_destination", assembled.items);
            commit_until_done(ctx, consumer, cursor, assembled.last_seq).await?;
            continue;
        };
        let request = Bytes::from(assembled.request);
        let mut delay = retry.initial_interval;
        loop {
            match client.send(request.clone()).await {
                SendOutcome::Accepted { rejected, message } => {
                    ctx.events.sent(assembled.items.saturating_sub(rejected));
                    if rejected > 0 {
                        tracing::warn!(consumer = consumer.as_str(), rejected, %message, "backend rejected part of a request");
                        ctx.events.dropped("rejected_by_backend", rejected);
                    }
                    break;
                }
                SendOutcome::Permanent(reason) => {
                    tracing::warn!(consumer = consumer.as_str(), items = assembled.items, %reason, "backend refused request permanently; dropping it");
                    ctx.events.dropped("permanent_error", assembled.items);
                    break;
                }
                SendOutcome::Retryable(reason) => {
                    ctx.events.error("export_retry");
                    tracing::warn!(consumer = consumer.as_str(), retry_in = ?delay, %reason, "export failed; will retry");
                    let mut stop = ctx.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                    delay = (delay * 2).min(retry.max_interval);
                }
            }
        }
        commit_until_done(ctx, consumer, cursor, assembled.last_seq).await?;
    }
}

/// Commits the cursor move, waiting out a full queue (the move itself frees space).
async fn commit_until_done(ctx: &StageContext, consumer: Consumer, from: u64, to: u64) -> Result<(), StageError> {
    let mut full_streak = 0;
    loop {
        match commit(&ctx.queue, consumer, from, to) {
            Ok(()) => return Ok(()),
            Err(err) => crate::context::wait_if_full(ctx, err, &mut full_streak).await?,
        }
        if ctx.stopping() {
            return Ok(());
        }
    }
}

/// Runs the export stage: one consumer task per destination, fed by the stage's wake-ups.
pub async fn run(ctx: StageContext) -> Result<(), StageError> {
    let exporters = ctx.config.exporters.clone();
    let targets = [
        (Consumer::ExportTraces, Signal::Traces, Some(exporters.traces)),
        (Consumer::ExportLogs, Signal::Logs, exporters.logs),
        (Consumer::ExportMetrics, Signal::Metrics, exporters.metrics),
    ];
    let mut destinations = Vec::new();
    for (consumer, signal, destination) in targets {
        let client = match destination {
            Some(Destination { otlp }) => Some(OtlpClient::new(&otlp, signal).map_err(StageError::Other)?),
            None => {
                tracing::warn!(
                    consumer = consumer.as_str(),
                    "no destination configured; items are counted as dropped (no_destination)"
                );
                None
            }
        };
        destinations.push(Target { consumer, client });
    }
    // One wake-up socket per process; fan it out to the consumers.
    let (notify, wake) = tokio::sync::watch::channel(0u64);
    let ctx_ref = &ctx;
    let consumers =
        futures_join_all(destinations.into_iter().map(|target| run_consumer(ctx_ref, target, wake.clone())));
    let mut woken = 0u64;
    let mut stop = ctx.shutdown.clone();
    let result = {
        tokio::pin!(consumers);
        loop {
            tokio::select! {
                result = &mut consumers => break result,
                _ = ctx.wake.wait(None) => {
                    woken += 1;
                    let _ = notify.send(woken);
                }
                _ = stop.wait_for(|s| *s) => {
                    // Consumers see the same signal; wait for them to finish their attempt.
                    break (&mut consumers).await;
                }
            }
        }
    };
    ctx.events.log_summary();
    result
}

/// Runs the futures concurrently; the first error wins.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Result<(), StageError>
where
    F: Future<Output = Result<(), StageError>>,
{
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        let mut index = 0;
        while index < pinned.len() {
            match pinned[index].as_mut().poll(cx) {
                std::task::Poll::Ready(Err(err)) => return std::task::Poll::Ready(Err(err)),
                std::task::Poll::Ready(Ok(())) => {
                    pinned.swap_remove(index);
                }
                std::task::Poll::Pending => index += 1,
            }
        }
        if pinned.is_empty() { std::task::Poll::Ready(Ok(())) } else { std::task::Poll::Pending }
    })
    .await
}
