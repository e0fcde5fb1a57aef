//! Credentials as `Authorization` header values: what exporters send and what receivers
//! expect (`auth` with `basic` or `bearer_token_file`). Secrets are read from files once, at
//! start; the values are never logged (and headers carrying them are marked sensitive).

use tailgate_config::HttpAuth;

/// The `Authorization` value for `auth`: `Basic base64(username:password)` or `Bearer token`
/// (a file's trailing newline is not part of the secret).
pub fn authorization(auth: &HttpAuth) -> Result<String, String> {
    let read_secret = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    Ok(match auth {
        HttpAuth::Basic { username, password_file } => {
            format!("Basic {}", base64(format!("{username}:{}", read_secret(password_file)?).as_bytes()))
        }
        HttpAuth::BearerTokenFile(path) => format!("Bearer {}", read_secret(path)?),
    })
}

/// Whether a request carries the `Authorization` a receiver requires (always, when it requires
/// none).
pub fn authorized(headers: &http::HeaderMap, expected: Option<&str>) -> bool {
    let Some(expected) = expected else { return true };
    headers.get(http::header::AUTHORIZATION).is_some_and(|presented| matches(presented.as_bytes(), expected.as_bytes()))
}

/// Whether `presented` equals `expected`, in time that does not depend on where they differ.
pub fn matches(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// Standard base64 with padding (for basic auth).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let bytes = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let word = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[((word >> (18 - 6 * index)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn only_the_exact_value_matches() {
        assert!(matches(b"Bearer abc", b"Bearer abc"));
        assert!(!matches(b"Bearer abd", b"Bearer abc"));
        assert!(!matches(b"Bearer ab", b"Bearer abc"));
        assert!(!matches(b"", b"Bearer abc"));
    }
}
