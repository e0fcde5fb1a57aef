//! A tonic codec that moves protobuf messages as raw bytes, so receive can walk the wire bytes
//! itself and export can send bytes it assembled from the queue, with no prost decode.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Encodes and decodes messages as their raw protobuf bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// The encoder half of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

/// The decoder half of [`RawCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `google.rpc.Status` (`google/rpc/status.proto`): the gRPC error model's rich status, carried
/// in the `grpc-status-details-bin` trailer and as the OTLP/HTTP error body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// A `google.rpc.Code`.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The developer-facing message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// `google.protobuf.Any` details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<AnyDetail>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyDetail {
    /// The type of `value`, e.g. [`RETRY_INFO_TYPE`].
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The encoded message.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo` (`google/rpc/error_details.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    /// How long the client should wait before retrying.
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoDuration {
    /// Whole seconds.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Fraction of a second, nanoseconds.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// The `type_url` of a `google.rpc.RetryInfo` detail.
pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// Encodes a `google.rpc.Status` carrying a `google.rpc.RetryInfo` detail, for the
/// `grpc-status-details-bin` trailer of a RESOURCE_EXHAUSTED answer (OTLP clients retry such an
/// answer only when RetryInfo is present).
pub fn status_with_retry_info(code: i32, message: &str, retry_after_secs: i64) -> Bytes {
    let retry_info = RetryInfo { retry_delay: Some(ProtoDuration { seconds: retry_after_secs, nanos: 0 }) };
    let detail = AnyDetail { type_url: RETRY_INFO_TYPE.to_owned(), value: retry_info.encode_to_vec() };
    Bytes::from(RpcStatus { code, message: message.to_owned(), details: vec![detail] }.encode_to_vec())
}

/// Encodes a plain `google.rpc.Status { code, message }` (the OTLP/HTTP protobuf error body).
pub fn status_body(code: i32, message: &str) -> Vec<u8> {
    RpcStatus { code, message: message.to_owned(), details: Vec::new() }.encode_to_vec()
}

/// What a server's `google.rpc.Status` (the `grpc-status-details-bin` trailer, or an OTLP/HTTP
/// error body) says about retrying: `None` without a `RetryInfo` detail (or bytes that are not
/// a status); `Some(None)` for a `RetryInfo` whose delay is absent, negative or malformed
/// ("retry, at your own pace"); `Some(Some(delay))` otherwise. The detail is matched on its type
/// name, whatever the host in its `type_url`.
pub fn retry_info(status: &[u8]) -> Option<Option<Duration>> {
    // Only the details: a status whose message is not UTF-8 must not hide its RetryInfo.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Details {
        #[prost(message, repeated, tag = "3")]
        details: Vec<AnyDetail>,
    }
    let status = Details::decode(status).ok()?;
    let detail = status
        .details
        .iter()
        .find(|detail| detail.type_url == RETRY_INFO_TYPE || detail.type_url.ends_with("/google.rpc.RetryInfo"))?;
    let delay = RetryInfo::decode(detail.value.as_slice()).ok().and_then(|info| info.retry_delay).and_then(|delay| {
        let seconds = u64::try_from(delay.seconds).ok()?;
        let nanos = u32::try_from(delay.nanos).ok().filter(|n| *n < 1_000_000_000)?;
        Some(Duration::new(seconds, nanos))
    });
    Some(delay)
}

/// The retry delay of [`retry_info`], when the server named a valid one.
pub fn retry_delay(status: &[u8]) -> Option<Duration> {
    retry_info(status).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_is_read_from_a_status_with_retry_info() {
        assert_eq!(retry_delay(&status_with_retry_info(8, "slow down", 3)), Some(Duration::from_secs(3)));
        let fraction = RetryInfo { retry_delay: Some(ProtoDuration { seconds: 1, nanos: 500_000_000 }) };
        let other = AnyDetail { type_url: "type.googleapis.com/google.rpc.DebugInfo".into(), value: vec![1, 2] };
        let status = RpcStatus {
            code: 14,
            message: String::new(),
            details: vec![other, AnyDetail { type_url: RETRY_INFO_TYPE.into(), value: fraction.encode_to_vec() }],
        };
        assert_eq!(retry_delay(&status.encode_to_vec()), Some(Duration::from_millis(1500)));
        // RetryInfo without a delay: retry, at the client's own pace.
        let bare = RpcStatus {
            code: 8,
            message: String::new(),
            details: vec![AnyDetail { type_url: "types.example.com/google.rpc.RetryInfo".into(), value: Vec::new() }],
        };
        assert_eq!(retry_info(&bare.encode_to_vec()), Some(None));
        // A message that is not UTF-8 does not hide the detail.
        let mut raw = Vec::new();
        raw.extend_from_slice(&[0x12, 2, 0xff, 0xfe]); // message: 2 bytes that are not UTF-8
        raw.extend_from_slice(&status_with_retry_info(8, "", 2)[2..]);
        assert_eq!(retry_delay(&raw), Some(Duration::from_secs(2)));
    }

    #[test]
    fn no_retry_delay_without_a_valid_retry_info() {
        assert_eq!(retry_info(&status_body(8, "too big")), None);
        assert_eq!(retry_info(b"x"), None);
        for (seconds, nanos) in [(-1, 0), (1, -1), (1, 1_000_000_000)] {
            let info = RetryInfo { retry_delay: Some(ProtoDuration { seconds, nanos }) };
            let status = RpcStatus {
                code: 8,
                message: String::new(),
                details: vec![AnyDetail { type_url: RETRY_INFO_TYPE.into(), value: info.encode_to_vec() }],
            };
            // Still a RetryInfo: retryable, with no delay to honour.
            assert_eq!(retry_info(&status.encode_to_vec()), Some(None), "{seconds} {nanos}");
        }
    }
}
