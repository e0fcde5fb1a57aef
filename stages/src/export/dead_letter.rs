//! The dead-letter store: OTLP items a backend keeps refusing, kept (in the queue's `state`
//! table, so within the disk budget and as durable as the queue) instead of blocking their
//! destination or being dropped. Each entry is a ready-to-send export request of one item.
//!
//! `tailgate dead-letter list` shows them; `tailgate dead-letter replay` asks the export stage
//! to send them again (a request stamp in `meta`; each consumer replays once per stamp, deletes
//! what its backend takes and keeps the rest); `tailgate dead-letter drop` deletes them.

use tailgate_ipc::{Consumer, Queue, QueueError, ReadTxn, WriteTxn};

/// Prefix of every dead-letter key: `dead_letter/<consumer>/<unix ms>/<n>`.
pub const PREFIX: &str = "dead_letter/";

/// `meta` key of the latest replay request (Unix ms).
pub const REPLAY_KEY: &str = "dead_letter/replay";

/// One stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its key in `state`.
    pub key: Vec<u8>,
    /// The destination that refused it.
    pub consumer: String,
    /// When it was stored, Unix ms.
    pub at_unix_ms: u64,
    /// Spans, records or points it carries.
    pub items: u32,
    /// Counter reason (`persistent_error`, `permanent_error`, ...).
    pub reason: String,
    /// The backend's last answer.
    pub message: String,
    /// The export request.
    pub request: Vec<u8>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The key and value storing one refused item (`n` keeps keys of one commit distinct).
pub fn entry(
    consumer: Consumer,
    n: usize,
    items: u32,
    reason: &str,
    message: &str,
    request: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let key = format!("{PREFIX}{}/{:020}/{n:06}", consumer.as_str(), now_ms()).into_bytes();
    let message = truncate(message, 1000);
    let mut value = Vec::with_capacity(8 + reason.len() + message.len() + request.len());
    value.extend_from_slice(&items.to_be_bytes());
    value.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    value.extend_from_slice(reason.as_bytes());
    value.extend_from_slice(&(message.len() as u16).to_be_bytes());
    value.extend_from_slice(message.as_bytes());
    value.extend_from_slice(request);
    (key, value)
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn decode(key: &[u8], value: &[u8]) -> Option<DeadLetter> {
    let name = std::str::from_utf8(key).ok()?.strip_prefix(PREFIX)?;
    let mut parts = name.split('/');
    let consumer = parts.next()?.to_string();
    let at_unix_ms = parts.next()?.parse().ok()?;
    let items = u32::from_be_bytes(value.get(..4)?.try_into().ok()?);
    let reason_len = u16::from_be_bytes(value.get(4..6)?.try_into().ok()?) as usize;
    let reason = std::str::from_utf8(value.get(6..6 + reason_len)?).ok()?.to_string();
    let at = 6 + reason_len;
    let message_len = u16::from_be_bytes(value.get(at..at + 2)?.try_into().ok()?) as usize;
    let message = std::str::from_utf8(value.get(at + 2..at + 2 + message_len)?).ok()?.to_string();
    let request = value.get(at + 2 + message_len..)?.to_vec();
    Some(DeadLetter { key: key.to_vec(), consumer, at_unix_ms, items, reason, message, request })
}

/// Every stored item (of one consumer, when given), oldest first.
pub fn list(queue: &Queue, txn: &ReadTxn<'_>, consumer: Option<Consumer>) -> Result<Vec<DeadLetter>, QueueError> {
    let prefix = match consumer {
        Some(consumer) => format!("{PREFIX}{}/", consumer.as_str()),
        None => PREFIX.to_string(),
    };
    Ok(queue.state_prefix(txn, prefix.as_bytes())?.into_iter().filter_map(|(key, value)| decode(key, value)).collect())
}

/// Asks the export stage to send every dead letter again.
pub fn request_replay(queue: &Queue) -> Result<(), QueueError> {
    let mut wtxn = queue.write()?;
    queue.set_meta_u64(&mut wtxn, REPLAY_KEY, now_ms())?;
    queue.commit(wtxn)
}

/// The replay request `consumer` has not handled yet, if any.
pub fn pending_replay(queue: &Queue, txn: &ReadTxn<'_>, consumer: Consumer) -> Result<Option<u64>, QueueError> {
    let Some(requested) = queue.meta_u64(txn, REPLAY_KEY)? else { return Ok(None) };
    let handled = queue.meta_u64(txn, &handled_key(consumer))?.unwrap_or(0);
    Ok((requested > handled).then_some(requested))
}

/// Records that `consumer` handled the replay request `stamp`.
pub fn replay_handled(
    queue: &Queue,
    wtxn: &mut WriteTxn<'_>,
    consumer: Consumer,
    stamp: u64,
) -> Result<(), QueueError> {
    queue.set_meta_u64(wtxn, &handled_key(consumer), stamp)
}

fn handled_key(consumer: Consumer) -> String {
    format!("{REPLAY_KEY}/{}", consumer.as_str())
}

/// Deletes the stored items (of one consumer, when given); returns how many.
pub fn drop_all(queue: &Queue, consumer: Option<Consumer>) -> Result<usize, QueueError> {
    let keys: Vec<Vec<u8>> = list(queue, &queue.read()?, consumer)?.into_iter().map(|letter| letter.key).collect();
    let mut wtxn = queue.write()?;
    for key in &keys {
        queue.state_delete(&mut wtxn, key)?;
    }
    queue.commit(wtxn)?;
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let (key, value) = entry(Consumer::ExportTraces, 3, 1, "persistent_error", "INTERNAL: boom", b"\x0a\x02xy");
        let letter = decode(&key, &value).unwrap();
        assert_eq!(letter.consumer, "export_traces");
        assert_eq!(
            (letter.items, letter.reason.as_str(), letter.message.as_str()),
            (1, "persistent_error", "INTERNAL: boom")
        );
        assert_eq!(letter.request, b"\x0a\x02xy");
        assert_eq!(truncate("aé", 2), "a");
    }
}
