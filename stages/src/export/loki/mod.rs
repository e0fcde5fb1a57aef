//! The Loki exporter: one consumer of `kept_logs`, pushing to Loki's `/loki/api/v1/push`.
//!
//! A delivery reads queue batches after the consumer's cursor (the same limits as OTLP
//! requests), turns their records into stream entries ([`entries`]), pushes them
//! ([`client`]), and moves the cursor together with the stream table (each stream's newest
//! timestamp) in one transaction. Refused entries are isolated by splitting the request, dropped
//! one by one and counted by reason ([`super::isolate`]); retryable failures resend the same
//! request with backoff.
//! The boundary is at-least-once: after a kill between push and commit the same request is built
//! again from the same stream table, so Loki receives identical entries and keeps one of each.

pub mod client;
pub mod entries;
pub mod proto;

use tailgate_config::LokiExporter;
use tailgate_ipc::batch;
use tailgate_ipc::{Consumer, Queue};

use crate::context::{StageContext, StageError};
use client::LokiClient;
use entries::{EntryBuilder, Prepared, STREAM_STATE_PREFIX, StreamTable};
use tailgate_ipc::clock::wall_now;

/// A Loki destination and its stream table.
#[derive(Debug)]
pub struct LokiSink {
    config: LokiExporter,
    client: LokiClient,
    /// Loaded from the queue at the first delivery.
    streams: Option<StreamTable>,
}

/// What one request read from the queue.
struct Read {
    cursor: u64,
    last_seq: u64,
    records: u64,
    prepared: Prepared,
}

impl LokiSink {
    /// Counts the backend's responses into `responses`.
    pub fn set_responses(&mut self, responses: crate::events::Responses) {
        self.client.responses = responses;
    }

    /// A sink for the configured endpoint.
    pub fn new(config: &LokiExporter) -> Result<LokiSink, StageError> {
        let client = LokiClient::new(config).map_err(|err| StageError::Other(format!("loki exporter: {err}")))?;
        Ok(LokiSink { config: config.clone(), client, streams: None })
    }

    fn read(&mut self, queue: &Queue, consumer: Consumer, max_items: u64) -> Result<Read, StageError> {
        let rtxn = queue.read()?;
        let streams = match self.streams.as_mut() {
            Some(streams) => streams,
            None => self.streams.insert(StreamTable::load(queue.state_prefix(&rtxn, STREAM_STATE_PREFIX)?.into_iter())),
        };
        let now = i64::try_from(wall_now()).unwrap_or(i64::MAX);
        let mut builder = EntryBuilder::new(&self.config);
        let (cursor, last_seq, records) = super::read_batches(queue, &rtxn, consumer, max_items, |_, value| {
            let source = batch::access_logs(value)?;
            builder.add_batch(source, streams, now);
            Ok(source.logs.len() as u64)
        })?;
        let prepared = builder.finish(streams);
        Ok(Read { cursor, last_seq, records, prepared })
    }

    /// The destination's policy at the disk budget.
    pub fn when_full(&self) -> tailgate_config::WhenFull {
        self.config.when_full
    }

    /// Delivers one request's worth of queue batches (or waits out failures until stopped).
    pub async fn deliver(
        &mut self,
        ctx: &StageContext,
        consumer: Consumer,
        breaker: &mut super::isolate::Breaker,
        max_items: u64,
    ) -> Result<(), StageError> {
        let read = self.read(&ctx.queue, consumer, max_items)?;
        let prepared = &read.prepared;
        ctx.events.dropped("out_of_order", prepared.dropped_out_of_order);
        ctx.events.dropped("stale", prepared.stale);
        if prepared.undecodable > 0 {
            ctx.events.error("undecodable_record");
        }
        if prepared.label_overflow > 0 {
            ctx.events.error("label_overflow");
        }
        let client = &self.client;
        let delivered = super::isolate::deliver(
            ctx,
            consumer.as_str(),
            &prepared.entries,
            std::iter::once(0..prepared.entries.len()).collect(),
            super::isolate::Policy {
                yield_when_full: self.config.when_full == tailgate_config::WhenFull::DropOldest,
                ..super::isolate::Policy::default()
            },
            breaker,
            async |part: &[entries::Entry]| client.push(&prepared.streams, part).await,
        )
        .await;
        if delivered.interrupted {
            return Ok(());
        }
        ctx.events.sent(delivered.accepted as u64);
        for (reason, count) in &delivered.refused {
            ctx.events.dropped(reason, *count as u64);
        }
        if !delivered.refused.is_empty() {
            tracing::warn!(consumer = consumer.as_str(), refused = ?delivered.refused, records = read.records, "loki refused entries; dropped them, kept the rest");
        }
        let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .streams
            .as_mut()
            .map(StreamTable::take_changes)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.map(|v| v.to_vec())))
            .collect();
        super::commit_until_done(ctx, consumer, read.cursor, read.last_seq, &changes).await
    }
}
