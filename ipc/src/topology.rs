//! The fixed process and edge topology of the design card.
//!
//! ```text
//! receive --spans--> tail_sample --kept_spans--> export (traces)
//!    |                    |      \--span_summaries--> spanmetrics --metrics--> export (metrics)
//!    |                    \--decisions table (trace_id -> keep/drop)
//!    +------logs------> log_mirror --kept_logs--> export (logs)
//!    +------metrics---------------------------------------------> export (metrics)
//! ```

/// A stage process. The supervisor starts one OS process per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageId {
    /// OTLP gRPC/HTTP intake into the `spans`, `logs` and `metrics` edges.
    Receive,
    /// Tail-based sampling: `spans` -> `kept_spans` plus the decisions table.
    TailSample,
    /// Logs follow their trace's decision: `logs` -> `kept_logs`.
    LogMirror,
    /// RED metrics from every decided span: `span_summaries` -> `metrics`.
    Spanmetrics,
    /// Delivery to the backends, one consumer per destination.
    Export,
}

impl StageId {
    /// Every stage, in start order (shutdown runs in this order too: intake stops first).
    pub const ALL: [StageId; 5] =
        [StageId::Receive, StageId::TailSample, StageId::LogMirror, StageId::Spanmetrics, StageId::Export];

    /// The snake_case id used on the command line, in config, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StageId::Receive => "receive",
            StageId::TailSample => "tail_sample",
            StageId::LogMirror => "log_mirror",
            StageId::Spanmetrics => "spanmetrics",
            StageId::Export => "export",
        }
    }

    /// Parses a stage id as written by [`StageId::as_str`].
    pub fn parse(name: &str) -> Option<StageId> {
        StageId::ALL.into_iter().find(|stage| stage.as_str() == name)
    }
}

impl std::fmt::Display for StageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An edge: an append-only table of batches between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Edge {
    /// Spans as received.
    Spans = 0,
    /// Spans of kept traces.
    KeptSpans = 1,
    /// Log records as received.
    Logs = 2,
    /// Log records whose trace was kept (or that were judged on their own).
    KeptLogs = 3,
    /// Metrics as received plus the ones spanmetrics produces.
    Metrics = 4,
    /// What spanmetrics needs of every decided span (kept or dropped), written by tail_sample in
    /// the transaction of the decision.
    SpanSummaries = 5,
}

impl Edge {
    /// Every edge.
    pub const ALL: [Edge; 6] =
        [Edge::Spans, Edge::KeptSpans, Edge::Logs, Edge::KeptLogs, Edge::Metrics, Edge::SpanSummaries];

    /// The table name in the LMDB environment and the label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Edge::Spans => "spans",
            Edge::KeptSpans => "kept_spans",
            Edge::Logs => "logs",
            Edge::KeptLogs => "kept_logs",
            Edge::Metrics => "metrics",
            Edge::SpanSummaries => "span_summaries",
        }
    }

    /// The consumers reading this edge; an entry is deleted once all of them are past it.
    pub fn consumers(self) -> &'static [Consumer] {
        match self {
            Edge::Spans => &[Consumer::TailSample],
            Edge::KeptSpans => &[Consumer::ExportTraces],
            Edge::Logs => &[Consumer::LogMirror],
            Edge::KeptLogs => &[Consumer::ExportLogs, Consumer::ExportLoki],
            Edge::Metrics => &[Consumer::ExportMetrics, Consumer::ExportRemoteWrite],
            Edge::SpanSummaries => &[Consumer::Spanmetrics],
        }
    }
}

/// A reader of one edge with its own durable cursor.
///
/// Every consumer of the topology exists, but only the active ones (see
/// [`crate::QueueOptions::inactive_consumers`]: a destination that is not configured) hold
/// entries back: an entry is deleted once every *active* consumer of its edge is past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Consumer {
    /// tail_sample reading `spans`.
    TailSample,
    /// log_mirror reading `logs`.
    LogMirror,
    /// spanmetrics reading `span_summaries`.
    Spanmetrics,
    /// export's trace destination reading `kept_spans`.
    ExportTraces,
    /// export's OTLP log destination reading `kept_logs`.
    ExportLogs,
    /// export's Loki destination reading `kept_logs`.
    ExportLoki,
    /// export's OTLP metric destination reading `metrics`.
    ExportMetrics,
    /// export's Prometheus remote-write destination reading `metrics`.
    ExportRemoteWrite,
}

impl Consumer {
    /// Every consumer.
    pub const ALL: [Consumer; 8] = [
        Consumer::TailSample,
        Consumer::LogMirror,
        Consumer::Spanmetrics,
        Consumer::ExportTraces,
        Consumer::ExportLogs,
        Consumer::ExportLoki,
        Consumer::ExportMetrics,
        Consumer::ExportRemoteWrite,
    ];

    /// The cursor's key in the cursors table.
    pub fn as_str(self) -> &'static str {
        match self {
            Consumer::TailSample => "tail_sample",
            Consumer::LogMirror => "log_mirror",
            Consumer::Spanmetrics => "spanmetrics",
            Consumer::ExportTraces => "export_traces",
            Consumer::ExportLogs => "export_logs",
            Consumer::ExportLoki => "export_loki",
            Consumer::ExportMetrics => "export_metrics",
            Consumer::ExportRemoteWrite => "export_remote_write",
        }
    }

    /// The edge this consumer reads.
    pub fn edge(self) -> Edge {
        match self {
            Consumer::TailSample => Edge::Spans,
            Consumer::LogMirror => Edge::Logs,
            Consumer::Spanmetrics => Edge::SpanSummaries,
            Consumer::ExportTraces => Edge::KeptSpans,
            Consumer::ExportLogs | Consumer::ExportLoki => Edge::KeptLogs,
            Consumer::ExportMetrics | Consumer::ExportRemoteWrite => Edge::Metrics,
        }
    }

    /// The stage process that owns this consumer (and receives its wake-ups).
    pub fn stage(self) -> StageId {
        match self {
            Consumer::TailSample => StageId::TailSample,
            Consumer::LogMirror => StageId::LogMirror,
            Consumer::Spanmetrics => StageId::Spanmetrics,
            Consumer::ExportTraces
            | Consumer::ExportLogs
            | Consumer::ExportLoki
            | Consumer::ExportMetrics
            | Consumer::ExportRemoteWrite => StageId::Export,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumer_is_listed_on_its_edge() {
        for edge in Edge::ALL {
            for consumer in edge.consumers() {
                assert_eq!(consumer.edge(), edge);
            }
        }
        for (index, consumer) in Consumer::ALL.iter().enumerate() {
            assert_eq!(*consumer as usize, index);
            assert!(consumer.edge().consumers().contains(consumer));
        }
        for stage in StageId::ALL {
            assert_eq!(StageId::parse(stage.as_str()), Some(stage));
        }
    }
}
