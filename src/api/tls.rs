//! TLS for the gRPC listener: rustls with ring (no OpenSSL), TLS 1.2 and 1.3 only; the certificate,
//! key and client CA re-read on SIGHUP or when their files change, without dropping connections;
//! optional client certificates (mTLS) whose DNS names map to roles.
//!
//! kluis runs its own accept loop instead of tonic's `tls_config`, which fixes the certificate at
//! start: every new connection takes the configuration in force when it arrives, and connections
//! already open keep the session they negotiated.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use super::conn_io::Unvectored;
use crate::policy::Role;

/// How long a client may take to finish its handshake before the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 512;

/// TLS settings, resolved from the configuration.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates; `None`: no client certificates asked.
    pub client_ca: Option<PathBuf>,
    /// With a client CA: refuse a handshake without a client certificate.
    pub client_cert_required: bool,
    /// A verified client certificate's DNS name → the role its caller has.
    pub client_roles: HashMap<String, Role>,
    /// How often the files are checked for changes (`None`: only on SIGHUP).
    pub poll: Option<Duration>,
}

/// Why TLS could not be set up or reloaded. Names files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The TLS configuration in force, swapped whole on reload.
pub struct Tls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times and sizes of the files the configuration was built from.
    stamps: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    /// Reads the files and builds the first configuration; any problem stops start-up.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let stamps = file_stamps(&settings);
        let config = build_config(&settings)?;
        Ok(Arc::new(Self {
            settings,
            current: RwLock::new(Arc::new(config)),
            stamps: std::sync::Mutex::new(stamps),
        }))
    }

    /// Re-reads the files and, if they make a valid configuration, puts it in force for new
    /// connections. A bad file leaves the previous configuration serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = file_stamps(&self.settings);
        let config = build_config(&self.settings)?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(config);
        }
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    fn reload_logged(&self, why: &str) {
        if let Err(e) = self.reload() {
            tracing::error!(error = %e, trigger = why, "TLS reload failed; the previous certificate stays in force");
        }
    }

    /// Whether any file changed since the configuration in force was read.
    fn files_changed(&self) -> bool {
        let now = file_stamps(&self.settings);
        self.stamps.lock().map(|s| *s != now).unwrap_or(false)
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.current
            .read()
            .ok()
            .map(|c| TlsAcceptor::from(c.clone()))
    }

    /// The role a verified client certificate maps to: the first of its DNS names (subject
    /// alternative names) that the configuration lists. `None` for an unmapped certificate.
    pub fn client_role(&self, leaf: &CertificateDer<'_>) -> Option<(String, Role)> {
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        cert.valid_dns_names().find_map(|name| {
            self.settings
                .client_roles
                .get(&name.to_ascii_lowercase())
                .map(|role| (name.to_ascii_lowercase(), *role))
        })
    }

    /// Reloads on SIGHUP and, if configured, when the files change; stops when `self` is dropped.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let poll = self.settings.poll;
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler: TLS reloads on file change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let trigger = tokio::select! {
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                    _ = tick.tick() => "poll",
                };
                let Some(tls) = weak.upgrade() else { return };
                if trigger == "SIGHUP" || (poll.is_some() && tls.files_changed()) {
                    tls.reload_logged(trigger);
                }
            }
        });
    }
}

fn file_stamps(settings: &TlsSettings) -> Vec<Option<(SystemTime, u64)>> {
    let mut paths = vec![&settings.cert, &settings.key];
    paths.extend(settings.client_ca.iter());
    paths
        .into_iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn build_config(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&settings.cert)?;
    let key_pem = zeroize::Zeroizing::new(read(&settings.key)?);
    // The key file's text is never quoted: only that it did not parse.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| file_error(&settings.key, "holds no PEM private key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path)? {
                roots
                    .add(ca)
                    .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.client_cert_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| file_error(path, format!("client CA: {e}")))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_error(&settings.cert, format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepted connections, handshaken with the configuration in force when each arrived, as
/// served: with vectored writes hidden from HTTP/2 ([`super::conn_io`]). Each handshake runs in
/// its own task (a slow client holds up nobody), bounded by a timeout; a failed handshake (wrong
/// CA, expired or missing client certificate, plaintext client) closes that connection and is
/// logged at info.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> impl tokio_stream::Stream<Item = Result<Unvectored<TlsStream<TcpStream>>, io::Error>> {
    handshaken(listener, tls).map(|c| c.map(Unvectored))
}

fn handshaken(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut tcp = super::tcp_incoming(listener);
    // Handshakes in progress at once: clients that open connections and never finish the
    // handshake hold at most this many sockets (each for at most HANDSHAKE_TIMEOUT).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = tcp.next() => next,
                () = tx.closed() => return,
            };
            let stream = match next {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    // Out of file descriptors, say: give connections time to close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => return,
            };
            let Some(acceptor) = tls.acceptor() else {
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!("too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let _ = tx.send(Ok(tls_stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = ?peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(peer = ?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tokio::io::AsyncWrite;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn settings(dir: &Path) -> TlsSettings {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        TlsSettings {
            cert: write(dir, "cert.pem", &cert.pem()),
            key: write(dir, "key.pem", &key.serialize_pem()),
            client_ca: None,
            client_cert_required: false,
            client_roles: HashMap::new(),
            poll: None,
        }
    }

    #[tokio::test]
    async fn served_tls_connections_have_no_vectored_writes_and_keep_the_peer() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&s.cert).unwrap())
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut served = std::pin::pin!(incoming(listener, Tls::load(s).unwrap()));

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let from = tcp.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, tcp), served.next());
        let _client = client.unwrap();
        let server = server.unwrap().unwrap();
        assert!(!server.is_write_vectored());
        assert_eq!(server.0.get_ref().0.peer_addr().unwrap(), from);
    }

    #[test]
    fn a_bad_key_file_is_named_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        s.key = write(dir.path(), "bad.pem", "SECRET-NOT-A-KEY");
        let err = Tls::load(s).err().unwrap().to_string();
        assert!(err.contains("bad.pem"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn a_failed_reload_keeps_the_previous_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let tls = Tls::load(s.clone()).unwrap();
        let before = tls.current.read().unwrap().clone();
        std::fs::write(&s.cert, "garbage").unwrap();
        assert!(tls.files_changed());
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.current.read().unwrap()));
    }
}
