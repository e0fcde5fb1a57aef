//! TLS on the receivers' listeners (`tls` under `receivers.otlp.protocols.grpc` / `.http`):
//! rustls with the ring provider, TLS 1.2 and 1.3, optional client certificates (mutual TLS).
//!
//! Handshakes run concurrently, each on its own task with a deadline, so one client that opens a
//! connection and says nothing (or handshakes slowly) delays nobody; at most
//! [`MAX_HANDSHAKES`] are in flight, further connections wait in the kernel's backlog. A failed
//! handshake (no client certificate under mutual TLS, plain text to a TLS port) is logged at
//! debug and counted; the listener keeps serving.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tailgate_config::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::StageError;
use crate::events::StageEvents;
use crate::tls_files;

/// Handshakes in flight per listener.
pub const MAX_HANDSHAKES: usize = 256;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server configuration for `tls`, offering `alpn` protocols.
pub fn server_config(tls: &ServerTls, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, StageError> {
    let chain = tls_files::certificates(&tls.cert_file, "certificate").map_err(StageError::Other)?;
    let key = tls_files::private_key(&tls.key_file).map_err(StageError::Other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| StageError::Other(format!("TLS: {err}")))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = tls_files::roots(path, "client CA").map_err(StageError::Other)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| StageError::Other(tls_files::bad("client CA", path, err)))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| StageError::Other(tls_files::bad("certificate and key", &tls.cert_file, err)))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS connection as the servers take it.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Accepts TCP connections on `listener` and hands on those whose handshake completed.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    events: Arc<StageEvents>,
) -> mpsc::Receiver<(TlsConnection, SocketAddr)> {
    let (sender, receiver) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or the like: back off instead of spinning.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if sender.is_closed() {
                return;
            }
            let _ = stream.set_nodelay(true);
            let (acceptor, sender, events) = (acceptor.clone(), sender.clone(), events.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _server_gone = sender.send((TlsConnection { stream }, peer)).await;
                    }
                    Ok(Err(err)) => {
                        events.error("tls_handshake");
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => {
                        events.error("tls_handshake");
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    receiver
}

/// The accepted TLS connections as an axum listener.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsConnection, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves the connections `accept` hands on; `local` is the listening address.
    pub fn new(connections: mpsc::Receiver<(TlsConnection, SocketAddr)>, local: SocketAddr) -> Self {
        TlsListener { connections, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept task only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
