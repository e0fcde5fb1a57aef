//! Loki's push API messages (`pkg/push/push.proto` in grafana/loki, package `logproto`), as
//! prost types. Field numbers and types follow that file:
//!
//! ```text
//! message PushRequest      { repeated StreamAdapter streams = 1; }
//! message StreamAdapter    { string labels = 1; repeated EntryAdapter entries = 2; uint64 hash = 3; }
//! message EntryAdapter     { google.protobuf.Timestamp timestamp = 1; string line = 2;
//!                            repeated LabelPairAdapter structuredMetadata = 3; }
//! message LabelPairAdapter { string name = 1; string value = 2; }
//! ```
//!
//! Clients leave `hash` and the server-side `parsed` field unset. The HTTP body is the encoded
//! `PushRequest` compressed with snappy's block format (not the framed one), content type
//! `application/x-protobuf`; Loki answers 204 on success.

/// `logproto.PushRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    /// One entry per label set.
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<StreamAdapter>,
}

/// `logproto.StreamAdapter`: the entries of one stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAdapter {
    /// The label set in selector syntax, e.g. `{service_name="checkout", level="error"}`.
    #[prost(string, tag = "1")]
    pub labels: String,
    /// The stream's entries, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<EntryAdapter>,
}

/// `logproto.EntryAdapter`: one log line.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryAdapter {
    /// When the line was logged.
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<Timestamp>,
    /// The line.
    #[prost(string, tag = "2")]
    pub line: String,
    /// Per-entry metadata that is not indexed (trace_id, span_id, attributes).
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPairAdapter>,
}

/// `logproto.LabelPairAdapter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPairAdapter {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// The timestamp of `unix_nanos`.
    pub fn from_unix_nanos(unix_nanos: i64) -> Timestamp {
        Timestamp { seconds: unix_nanos.div_euclid(1_000_000_000), nanos: unix_nanos.rem_euclid(1_000_000_000) as i32 }
    }
}
