//! Test certificates: a CA, a server certificate for 127.0.0.1 and a client certificate (rcgen).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
pub struct Pki {
    /// The CA certificate (PEM).
    pub ca: String,
    /// The client certificate and its key (PEM).
    pub client: String,
}

/// Writes `ca.pem`, `server.pem`, `server.key`, `client.pem` and `client.key` into `dir`.
pub fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tailgate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["client.test".into()]);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), &server_cert).unwrap();
    std::fs::write(dir.join("server.key"), &server_key).unwrap();
    std::fs::write(dir.join("client.pem"), &client_cert).unwrap();
    std::fs::write(dir.join("client.key"), &client_key).unwrap();
    Pki { ca: ca.pem(), client: format!("{client_cert}{client_key}") }
}
