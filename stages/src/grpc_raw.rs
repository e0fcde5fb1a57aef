//! A tonic codec that moves protobuf messages as raw bytes, so receive can walk the wire bytes
//! itself and export can send bytes it assembled from the queue, with no prost decode.

use bytes::{Buf, BufMut, Bytes};
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

/// Encodes a `google.rpc.Status` carrying a `google.rpc.RetryInfo` detail, for the
/// `grpc-status-details-bin` trailer of a RESOURCE_EXHAUSTED answer (OTLP clients retry such an
/// answer only when RetryInfo is present).
pub fn status_with_retry_info(code: i32, message: &str, retry_after_secs: i64) -> Bytes {
    // RetryInfo { retry_delay: Duration { seconds } }
    let mut duration = Vec::new();
    put_varint_field(&mut duration, 1, retry_after_secs as u64);
    let mut retry_info = Vec::new();
    put_bytes_field(&mut retry_info, 1, &duration);
    // Any { type_url, value }
    let mut any = Vec::new();
    put_bytes_field(&mut any, 1, b"type.googleapis.com/google.rpc.RetryInfo");
    put_bytes_field(&mut any, 2, &retry_info);
    // Status { code, message, details }
    let mut status = Vec::new();
    put_varint_field(&mut status, 1, code as u64);
    put_bytes_field(&mut status, 2, message.as_bytes());
    put_bytes_field(&mut status, 3, &any);
    Bytes::from(status)
}

/// Encodes a plain `google.rpc.Status { code, message }` (the OTLP/HTTP protobuf error body).
pub fn status_body(code: i32, message: &str) -> Vec<u8> {
    let mut status = Vec::new();
    put_varint_field(&mut status, 1, code as u64);
    put_bytes_field(&mut status, 2, message.as_bytes());
    status
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, value);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}
