//! Certificate and key files as TLS configurations take them (receivers and exporters alike),
//! with one wording for every failure: `cannot read TLS <what> <path>: ...` when the file cannot
//! be read, `TLS <what> <path>: ...` when its contents are not what is asked for.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A file's bytes.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("cannot read TLS {what} {}: {err}", path.display()))
}

/// The failure message for `path`'s contents.
pub fn bad(what: &str, path: &Path, err: impl std::fmt::Display) -> String {
    format!("TLS {what} {}: {err}", path.display())
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(path, what)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(what, path, err))?;
    if certs.is_empty() {
        return Err(bad(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(&read(path, "key")?).map_err(|err| bad("key", path, err))
}

/// A root store of the CA certificates in a PEM file.
pub fn roots(path: &Path, what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path, what)? {
        roots.add(cert).map_err(|err| bad(what, path, err))?;
    }
    Ok(roots)
}
