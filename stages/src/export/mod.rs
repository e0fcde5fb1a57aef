//! export: one consumer per destination, each reading its edge with its own cursor, so the
//! edge's depth is that destination's true backlog. Destinations: OTLP/gRPC for every signal
//! ([`otlp`]), Loki's push API for logs ([`loki`]); a signal may have several, each its own
//! consumer. A consumer without a configured destination is inactive (its cursor holds nothing
//! back), except the first consumer of an edge with no destination at all, which counts what it
//! reads as dropped (`no_destination`).
//!
//! Ack rule: a queue batch leaves the queue only when the backend acknowledged the requests that
//! carried it, or refused items of it for good: OTLP items go to the dead-letter store
//! ([`dead_letter`]), Loki entries and remote-write series are dropped and counted by reason.
//! Requests are capped by their encoded size; a request the backend refuses (too large,
//! invalid) or keeps failing on is split until the refused items stand alone ([`isolate`]).
//! Retries back off through a circuit breaker per destination ([`isolate::Breaker`]).
//! The boundary to the backend is at-least-once: a request sent but not yet committed is sent
//! again after a kill.
//!
//! Batching follows the Collector's batch processor: a request goes out once `send_batch_size`
//! items are waiting or `timeout` after the consumer first saw a waiting item. Waiting items are
//! counted from batch headers; the request is assembled only when it is sent. A request carries whole queue
//! batches, so it may exceed `send_batch_size` (which is a trigger, not a cap).

pub mod dead_letter;
pub mod http;
pub mod isolate;
pub mod loki;
pub mod otlp;
pub mod parts;
pub mod prometheus;

use std::time::Duration;

use bytes::Bytes;
use tailgate_config::{Config, WhenFull};
use tailgate_ipc::batch;
use tailgate_ipc::{Consumer, Edge, Queue, QueueError, ReadTxn};

use crate::context::{StageContext, StageError};
use crate::otlp_wire::{self, Signal};
use isolate::{Attempt, Breaker, Policy};
use loki::LokiSink;
use otlp::{OtlpClient, SendOutcome};
use parts::Items;
use prometheus::RemoteWriteSink;

/// Most queue batches read into one request.
const MAX_BATCHES_PER_REQUEST: usize = 256;
/// A request stops growing at this size (after its first batch), below the 4 MiB message limit
/// gRPC servers apply by default. Stage outputs are sealed at 1 MiB, so a request holds at least
/// one whole batch.
const MAX_REQUEST_BYTES: usize = 3 << 20;

/// Where one consumer delivers.
enum Sink {
    Otlp(Box<OtlpClient>),
    Loki(Box<LokiSink>),
    RemoteWrite(Box<RemoteWriteSink>),
    /// No destination for the edge: count and drop.
    Discard,
}

impl Sink {
    /// The destination's policy at the disk budget.
    fn when_full(&self) -> WhenFull {
        match self {
            Sink::Otlp(client) => client.when_full,
            Sink::Loki(loki) => loki.when_full(),
            Sink::RemoteWrite(remote) => remote.when_full(),
            Sink::Discard => WhenFull::PushBack,
        }
    }
}

/// Whether the queue takes intake now, with room for a step's worth more (receive's group
/// commits are refused a little below the intake line). A read error counts as yes.
fn queue_admits(ctx: &StageContext) -> bool {
    let room = ctx.queue.max_step_bytes() as u64;
    ctx.queue.read().and_then(|txn| ctx.queue.admits_bytes(&txn, room)).unwrap_or(true)
}

/// `when_full: drop_oldest`: while intake is refused, the destination gives up its oldest
/// batches (a tenth of the budget's worth per round), counted as `budget_full`. Returns whether
/// it dropped anything.
async fn drop_oldest(ctx: &StageContext, consumer: Consumer) -> Result<bool, StageError> {
    let queue = &ctx.queue;
    let (cursor, to, items, bytes) = {
        let rtxn = queue.read()?;
        if queue.admits_bytes(&rtxn, queue.max_step_bytes() as u64)? {
            return Ok(false);
        }
        let cursor = queue.cursor(&rtxn, consumer)?;
        let goal = queue.capacity_bytes() / 10;
        let (mut to, mut items, mut bytes) = (cursor, 0u64, 0u64);
        for entry in queue.entries_after(&rtxn, consumer.edge(), cursor)? {
            let (seq, value) = entry?;
            to = seq;
            bytes += value.len() as u64;
            items += batch::BatchHeader::parse(value).map(|h| u64::from(h.items)).unwrap_or(0);
            if bytes >= goal {
                break;
            }
        }
        (cursor, to, items, bytes)
    };
    if to == cursor {
        return Ok(false);
    }
    // Near the end of the map even a delete can find no room (copied pages): wait it out.
    commit_until_done(ctx, consumer, cursor, to, &[]).await?;
    ctx.events.dropped("budget_full", items);
    tracing::warn!(
        consumer = consumer.as_str(),
        items,
        bytes,
        "queue at its disk budget: dropped this destination's oldest data (when_full: drop_oldest)"
    );
    Ok(true)
}

/// The export consumers the configuration gives a destination, each with its sink.
fn sinks(config: &Config) -> Result<Vec<(Consumer, Sink)>, StageError> {
    let exporters = &config.exporters;
    let otlp = |settings: &tailgate_config::OtlpExporter, signal| {
        OtlpClient::new(settings, signal).map(|client| Sink::Otlp(Box::new(client))).map_err(StageError::Other)
    };
    let mut out = vec![(Consumer::ExportTraces, otlp(&exporters.traces.otlp, Signal::Traces)?)];
    let logs = exporters.logs.as_ref();
    if let Some(settings) = logs.and_then(|l| l.otlp.as_ref()) {
        out.push((Consumer::ExportLogs, otlp(settings, Signal::Logs)?));
    }
    if let Some(settings) = logs.and_then(|l| l.loki.as_ref()) {
        out.push((Consumer::ExportLoki, Sink::Loki(Box::new(LokiSink::new(settings)?))));
    }
    let metrics = exporters.metrics.as_ref();
    if let Some(settings) = metrics.and_then(|m| m.otlp.as_ref()) {
        out.push((Consumer::ExportMetrics, otlp(settings, Signal::Metrics)?));
    }
    if let Some(settings) = metrics.and_then(|m| m.prometheusremotewrite.as_ref()) {
        out.push((Consumer::ExportRemoteWrite, Sink::RemoteWrite(Box::new(RemoteWriteSink::new(settings)?))));
    }
    for edge in [Edge::KeptLogs, Edge::Metrics] {
        if !out.iter().any(|(consumer, _)| consumer.edge() == edge) {
            out.push((edge.consumers()[0], Sink::Discard));
        }
    }
    Ok(out)
}

/// Export consumers that have no destination in `config`: their cursors must not hold entries
/// back. Every process opens the queue with this list (see `QueueOptions::inactive_consumers`).
pub fn inactive_consumers(config: &Config) -> Vec<Consumer> {
    let exporters = &config.exporters;
    let logs = exporters.logs.as_ref();
    let metrics = exporters.metrics.as_ref();
    let mut inactive = Vec::new();
    let has_metrics_otlp = metrics.is_some_and(|m| m.otlp.is_some());
    let has_remote_write = metrics.is_some_and(|m| m.prometheusremotewrite.is_some());
    if !has_metrics_otlp && has_remote_write {
        inactive.push(Consumer::ExportMetrics);
    }
    if !has_remote_write {
        inactive.push(Consumer::ExportRemoteWrite);
    }
    let has_logs_otlp = logs.is_some_and(|l| l.otlp.is_some());
    let has_loki = logs.is_some_and(|l| l.loki.is_some());
    // The first consumer of an edge without any destination stays active and discards.
    if !has_logs_otlp && has_loki {
        inactive.push(Consumer::ExportLogs);
    }
    if !has_loki {
        inactive.push(Consumer::ExportLoki);
    }
    inactive
}

/// Reads batches after the consumer's cursor, handing each to `take` (which returns its item
/// count), until `max_items` are in or a request's size or batch limit is reached. Returns
/// (cursor, last sequence number taken, items).
pub fn read_batches(
    queue: &Queue,
    rtxn: &ReadTxn<'_>,
    consumer: Consumer,
    max_items: u64,
    mut take: impl FnMut(u64, &[u8]) -> Result<u64, StageError>,
) -> Result<(u64, u64, u64), StageError> {
    let cursor = queue.cursor(rtxn, consumer)?;
    let (mut last_seq, mut items, mut bytes) = (cursor, 0u64, 0usize);
    for (taken, entry) in queue.entries_after(rtxn, consumer.edge(), cursor)?.enumerate() {
        if taken == MAX_BATCHES_PER_REQUEST || items >= max_items || bytes >= MAX_REQUEST_BYTES {
            break;
        }
        let (seq, value) = entry?;
        if taken > 0 && bytes + value.len() > MAX_REQUEST_BYTES {
            break;
        }
        // A batch that fails its checks names itself, so the stage can quarantine exactly it.
        items += take(seq, value).map_err(|err| match err {
            StageError::Batch(source) => StageError::Queue(QueueError::Corrupt { edge: consumer.edge(), seq, source }),
            other => other,
        })?;
        bytes += value.len();
        last_seq = seq;
    }
    Ok((cursor, last_seq, items))
}

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

/// Reads batches after the consumer's cursor into one OTLP request, stopping once `max_items`
/// are in.
pub fn assemble(queue: &Queue, consumer: Consumer, max_items: u64) -> Result<(u64, Assembled), StageError> {
    let rtxn = queue.read()?;
    let mut request = Vec::new();
    let (cursor, last_seq, items) =
        read_batches(queue, &rtxn, consumer, max_items, |_, value| match consumer.edge() {
            Edge::KeptSpans | Edge::Spans => {
                let source = batch::access_spans(value)?;
                let items = source.spans.iter().map(|span| (span.scope.to_native(), span.body.as_slice()));
                write_groups(&mut request, &source.resources, &source.scopes, items);
                Ok(source.spans.len() as u64)
            }
            Edge::KeptLogs | Edge::Logs => {
                let source = batch::access_logs(value)?;
                let items = source.logs.iter().map(|log| (log.scope.to_native(), log.body.as_slice()));
                write_groups(&mut request, &source.resources, &source.scopes, items);
                Ok(source.logs.len() as u64)
            }
            Edge::Metrics => {
                let source = batch::access_metrics(value)?;
                // Concatenated encodings of one message type merge their repeated fields.
                for encoded in source.requests.iter() {
                    request.extend_from_slice(encoded.as_slice());
                }
                Ok(u64::from(source.data_points.to_native()))
            }
            Edge::SpanSummaries => Err(StageError::Other("span summaries are not exported".into())),
        })?;
    Ok((cursor, Assembled { request, items, last_seq }))
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

/// Moves the consumer's cursor past what was delivered (or permanently refused), with the
/// destination's state changes ((key, Some(value)) to put, (key, None) to delete).
fn commit(
    queue: &Queue,
    consumer: Consumer,
    from: u64,
    to: u64,
    changes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<(), StageError> {
    let mut wtxn = queue.write()?;
    queue.advance(&mut wtxn, consumer, from, to)?;
    for (key, value) in changes {
        match value {
            Some(value) => queue.state_put(&mut wtxn, key, value)?,
            None => queue.state_delete(&mut wtxn, key)?,
        }
    }
    queue.commit(wtxn)?;
    Ok(())
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

/// Sleeps `wait` unless shutdown comes first; returns false when stopping.
async fn pause(ctx: &StageContext, wait: Duration) -> bool {
    let mut stop = ctx.shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(wait) => !ctx.stopping(),
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Runs one consumer until shutdown.
async fn run_consumer(
    ctx: &StageContext,
    consumer: Consumer,
    mut sink: Sink,
    mut wake: tokio::sync::watch::Receiver<u64>,
) -> Result<(), StageError> {
    let exporters = &ctx.config.exporters;
    let batch_size = u64::from(exporters.batch.send_batch_size);
    let batch_timeout = exporters.batch.timeout;
    // When this consumer first saw the items it is now waiting to send (the batch timer).
    let mut waiting_since: Option<std::time::Instant> = None;
    let mut breaker = Breaker::default();
    loop {
        if ctx.stopping() {
            return Ok(());
        }
        if let Sink::Otlp(client) = &mut sink {
            replay_dead_letters(ctx, consumer, client).await?;
        }
        // Nothing of this destination's left to drop while intake stays refused: the data is
        // elsewhere; retry at the backoff's pace instead of spinning.
        if sink.when_full() == WhenFull::DropOldest
            && !queue_admits(ctx)
            && !drop_oldest(ctx, consumer).await?
            && !pause(ctx, exporters.retry_on_failure.max_interval).await
        {
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
        match &mut sink {
            Sink::Otlp(client) => deliver_otlp(ctx, consumer, client, &mut breaker, batch_size).await?,
            Sink::Loki(loki) => loki.deliver(ctx, consumer, &mut breaker, batch_size).await?,
            Sink::RemoteWrite(remote) => remote.deliver(ctx, consumer, &mut breaker, batch_size).await?,
            Sink::Discard => {
                let (cursor, assembled) = assemble(&ctx.queue, consumer, batch_size)?;
                ctx.events.dropped("no_destination", assembled.items);
                commit_until_done(ctx, consumer, cursor, assembled.last_seq, &[]).await?;
            }
        }
    }
}

/// Sends one request's worth of queue batches: split into parts within the request size limit,
/// each retried through the circuit breaker until it is taken; a part the backend refuses (too
/// large, invalid) or keeps failing on is split until the refused items stand alone, and those
/// go to the dead-letter store in the same transaction that moves the cursor.
async fn deliver_otlp(
    ctx: &StageContext,
    consumer: Consumer,
    client: &mut OtlpClient,
    breaker: &mut Breaker,
    batch_size: u64,
) -> Result<(), StageError> {
    let read = Items::read(&ctx.queue, consumer, batch_size)?;
    let policy = Policy {
        retry_limit: None,
        persistent_after: Some(ctx.config.exporters.dead_letter.after),
        yield_when_full: client.when_full == WhenFull::DropOldest,
    };
    let initial = read.parts(MAX_REQUEST_BYTES);
    let delivered = isolate::deliver(ctx, consumer.as_str(), &read.items, initial, policy, breaker, async |part| {
        match client.send(Bytes::from(read.encode(part))).await {
            SendOutcome::Accepted { rejected, message } => {
                if rejected > 0 {
                    tracing::warn!(consumer = consumer.as_str(), rejected, %message, "backend rejected part of a request");
                    ctx.events.dropped("rejected_by_backend", rejected);
                }
                Attempt::Accepted
            }
            SendOutcome::Permanent(message) => Attempt::Refused { reason: "permanent_error", message },
            SendOutcome::Failed(message) => Attempt::Failed { message },
            SendOutcome::Retryable(message, after) => Attempt::Retry { message, after },
        }
    })
    .await;
    if delivered.interrupted {
        return Ok(());
    }
    let mut changes = Vec::with_capacity(delivered.refused_items.len());
    let mut refused_count = 0u64;
    for (n, (index, reason, message)) in delivered.refused_items.iter().enumerate() {
        let item = read.items[*index];
        refused_count += u64::from(item.count);
        let request = read.encode(std::slice::from_ref(&item));
        let (key, value) = dead_letter::entry(consumer, n, item.count, reason, message, &request);
        changes.push((key, Some(value)));
    }
    if refused_count > 0 {
        tracing::warn!(consumer = consumer.as_str(), items = refused_count, refused = ?delivered.refused, "backend refused items; kept them in the dead-letter store, delivered the rest");
        ctx.events.dropped("dead_lettered", refused_count);
    }
    ctx.events.sent(read.count().saturating_sub(refused_count));
    commit_until_done(ctx, consumer, read.cursor, read.last_seq, &changes).await
}

/// Sends the consumer's dead letters again once per replay request (`tailgate dead-letter
/// replay`): what the backend takes is deleted, the rest stays. Stops at the first failure
/// that is not about the item (the backend is down: try again at the next request).
async fn replay_dead_letters(
    ctx: &StageContext,
    consumer: Consumer,
    client: &mut OtlpClient,
) -> Result<(), StageError> {
    let (stamp, letters) = {
        let rtxn = ctx.queue.read()?;
        let Some(stamp) = dead_letter::pending_replay(&ctx.queue, &rtxn, consumer)? else { return Ok(()) };
        (stamp, dead_letter::list(&ctx.queue, &rtxn, Some(consumer))?)
    };
    let (mut sent, mut kept) = (0u64, 0u64);
    let mut delivered = Vec::new();
    for letter in &letters {
        match client.send(Bytes::from(letter.request.clone())).await {
            SendOutcome::Accepted { .. } => {
                sent += u64::from(letter.items);
                delivered.push(letter.key.clone());
            }
            SendOutcome::Permanent(_) | SendOutcome::Failed(_) => kept += u64::from(letter.items),
            SendOutcome::Retryable(message, _) => {
                tracing::warn!(consumer = consumer.as_str(), %message, "dead-letter replay stopped: destination unavailable");
                break;
            }
        }
    }
    let mut wtxn = ctx.queue.write()?;
    for key in &delivered {
        ctx.queue.state_delete(&mut wtxn, key)?;
    }
    dead_letter::replay_handled(&ctx.queue, &mut wtxn, consumer, stamp)?;
    ctx.queue.commit(wtxn)?;
    ctx.events.sent(sent);
    tracing::info!(consumer = consumer.as_str(), sent, kept, "dead letters replayed");
    Ok(())
}

/// Commits the cursor move, waiting out a full queue (the move itself frees space).
async fn commit_until_done(
    ctx: &StageContext,
    consumer: Consumer,
    from: u64,
    to: u64,
    changes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<(), StageError> {
    let mut full_streak = 0;
    loop {
        match commit(&ctx.queue, consumer, from, to, changes) {
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
    // Every wait of a destination is bounded by a timeout or the backoff; the runtime's own
    // heartbeat shows the process is not stuck.
    let _heartbeat = ctx.beat_while_runtime_runs();
    let mut sinks = sinks(&ctx.config)?;
    for (consumer, sink) in &mut sinks {
        let responses = crate::events::Responses::to(ctx.events.clone(), consumer.as_str());
        match sink {
            Sink::Otlp(client) => client.responses = responses,
            Sink::Loki(loki) => loki.set_responses(responses),
            Sink::RemoteWrite(remote) => remote.responses = responses,
            Sink::Discard => {}
        }
    }
    for (consumer, sink) in &sinks {
        if matches!(sink, Sink::Discard) {
            tracing::warn!(
                consumer = consumer.as_str(),
                "no destination configured; items are counted as dropped (no_destination)"
            );
        }
    }
    // One wake-up socket per process; fan it out to the consumers.
    let (notify, wake) = tokio::sync::watch::channel(0u64);
    let ctx_ref = &ctx;
    let consumers =
        futures_join_all(sinks.into_iter().map(|(consumer, sink)| run_consumer(ctx_ref, consumer, sink, wake.clone())));
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
