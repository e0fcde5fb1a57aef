//! What the HTTP destinations (Loki, Prometheus remote write) share: a client with the
//! configured headers and credentials. Credentials are read from files once, at start, and
//! marked sensitive so they never appear in logs or debug output.

use crate::events::Responses;
use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tailgate_config::HttpAuth;

use super::isolate::Attempt;

/// Setting up a client failed (bad header, unreadable credentials file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpSetupError(String);

/// The settings a client is built from.
#[derive(Debug)]
pub struct HttpSetup<'c> {
    /// Configured headers.
    pub headers: &'c BTreeMap<String, String>,
    /// Credentials.
    pub auth: Option<&'c HttpAuth>,
    /// Deadline of one request (and of connecting).
    pub timeout: Duration,
    /// TLS settings of an `https://` endpoint.
    pub tls: Option<&'c tailgate_config::ClientTls>,
}

impl HttpSetup<'_> {
    /// The client and the headers every request carries (plus `extra`, e.g. a tenant header).
    pub fn build(&self, extra: Option<(&'static str, &str)>) -> Result<(reqwest::Client, HeaderMap), HttpSetupError> {
        let value = |text: &str, what: &str| {
            HeaderValue::from_str(text).map_err(|_| HttpSetupError(format!("{what} is not a valid header value")))
        };
        let mut headers = HeaderMap::new();
        for (name, text) in self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpSetupError(format!("{name:?} is not a valid header name")))?;
            headers.insert(name, value(text, "a configured header")?);
        }
        if let Some((name, text)) = extra {
            headers.insert(name, value(text, name)?);
        }
        let authorization = match self.auth {
            None => None,
            Some(auth) => {
                Some(value(&crate::credentials::authorization(auth).map_err(HttpSetupError)?, "the credentials")?)
            }
        };
        if let Some(mut header) = authorization {
            header.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, header);
        }
        let builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .tls_backend_preconfigured(client_tls(self.tls)?);
        let client = builder.build().map_err(|err| HttpSetupError(err.to_string()))?;
        Ok((client, headers))
    }
}

/// The TLS of an HTTP exporter, for `https://` endpoints: ring explicitly (no process-wide
/// provider needed), the CA certificates of `tls.ca_file` or else the system's, and the client
/// certificate for mutual TLS.
fn client_tls(tls: Option<&tailgate_config::ClientTls>) -> Result<rustls::ClientConfig, HttpSetupError> {
    use crate::tls_files;
    let roots = match tls.and_then(|tls| tls.ca_file.as_deref()) {
        Some(ca) => tls_files::roots(ca, "CA").map_err(HttpSetupError)?,
        None => {
            // Unreadable entries of the system store are skipped, as every TLS client does.
            let mut roots = rustls::RootCertStore::empty();
            let _ignored = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        }
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| HttpSetupError(format!("TLS: {err}")))?
        .with_root_certificates(roots);
    let identity = tls.and_then(|tls| Some((tls.cert_file.as_deref()?, tls.key_file.as_deref()?)));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = tls_files::certificates(cert, "certificate").map_err(HttpSetupError)?;
            let key = tls_files::private_key(key).map_err(HttpSetupError)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| HttpSetupError(tls_files::bad("certificate", cert, err)))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A backend's answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, in whole seconds.
    pub after: Option<Duration>,
    /// The body of a non-2xx answer (the backend's explanation); empty on success.
    pub body: String,
}

impl Answer {
    /// Whether the backend took the request.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends a request; a transport failure is retryable. The response is counted in `responses`
/// (`http_<status>`, or `transport` when none came).
pub async fn send(request: reqwest::RequestBuilder, responses: &Responses) -> Result<Answer, Attempt> {
    let response = request.send().await.map_err(|err| {
        responses.record("transport");
        Attempt::Retry { message: format!("transport: {err}"), after: None }
    })?;
    let status = response.status().as_u16();
    responses.record(&format!("http_{status}"));
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| retry_after(value.as_bytes(), std::time::SystemTime::now()));
    let body = if (200..300).contains(&status) { String::new() } else { response.text().await.unwrap_or_default() };
    Ok(Answer { status, after, body })
}

/// The wait a `Retry-After` header asks for (RFC 9110 section 10.2.3): delay-seconds or an
/// HTTP-date, which counts from `now` (a date in the past: retry at once). `None` for a value
/// that is neither.
pub fn retry_after(value: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time".
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Snappy's block format (what Loki and remote write take), or a refusal to send.
pub fn snappy(bytes: &[u8]) -> Result<Vec<u8>, Attempt> {
    snap::raw::Encoder::new()
        .compress_vec(bytes)
        .map_err(|err| Attempt::Refused { reason: "encoding", message: err.to_string() })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::retry_after;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        // 2015-10-21T07:28:00Z, the RFC's example date.
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after(b"120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(b" 0 ", now), Some(Duration::ZERO));
        assert_eq!(retry_after(b"Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        // A date already past: at once.
        assert_eq!(retry_after(b"Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after(b"99999999999999999999999", now), Some(Duration::from_secs(u64::MAX)));
        for bad in [&b""[..], b"-5", b"1.5", b"soon", b"\xff\xfe"] {
            assert_eq!(retry_after(bad, SystemTime::now()), None, "{bad:?}");
        }
    }
}
