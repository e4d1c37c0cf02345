//! HTTPS of Pier's own: the certificate and key from PEM files, picked up
//! again when the files change (cert-manager and other tools rotate them in
//! place), or from an ACME CA (`acme`), and the acceptor the accept loop
//! wraps client connections in.
//!
//! A leaf beside `zerocopy`, whose client connections it wraps; `server`
//! builds it from `config`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

mod acme;

use self::acme::ACME_TLS;

/// Marks a request that came over Pier's own TLS (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Secured;

pub use self::acme::Acme;
use crate::config::ServerConfig;
use crate::telemetry::metrics::metrics;
use crate::zerocopy::ClientIo;

/// How often the files are looked at for a rotation: a `stat` of each.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The first byte of every TLS connection (a handshake record).
const HANDSHAKE_RECORD: u8 = 0x16;

/// The provider every TLS context here uses (the one the HTTP and S3
/// clients are built on too).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and key read from PEM files.
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like when last read, good or bad: a pair that
    /// failed is not read (and complained about) again until it changes.
    seen: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A file's identity and version, as `stat` tells them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

type Stamp = (FileStamp, FileStamp);

fn stamp(path: &Path) -> io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

impl CertFiles {
    /// Reads the pair; an unreadable or mismatched pair is an error, since
    /// there is no older one to fall back to.
    pub fn open(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let before = (stamp(cert), stamp(key));
        let loaded = load_pair(cert, key)?;
        note_expiry(&loaded);
        let seen = match before {
            (Ok(c), Ok(k)) => Some((c, k)),
            _ => None,
        };
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            seen: Mutex::new(seen),
        }))
    }

    /// Reads the files again if they changed since last looked at. A new
    /// pair that cannot be used is logged and the one in use kept.
    pub fn reload_if_changed(&self) {
        let now = match (stamp(&self.cert), stamp(&self.key)) {
            (Ok(c), Ok(k)) => (c, k),
            // Mid-rotation, or gone: keep serving what is loaded.
            _ => return,
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.as_ref() == Some(&now) {
                return;
            }
            *seen = Some(now);
        }
        match load_pair(&self.cert, &self.key) {
            Ok(loaded) => {
                taken_up(&loaded);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                refused();
                tracing::warn!(
                    cert = %self.cert.display(),
                    error = format!("{e:#}"),
                    "the changed TLS certificate or key cannot be used; keeping the one in use"
                );
            }
        }
    }

    /// Looks at the files every [`RELOAD_EVERY`] for as long as `self` is
    /// held elsewhere.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(files) = weak.upgrade() else { return };
                // A stat and, rarely, a read of two small files.
                let _ = tokio::task::spawn_blocking(move || files.reload_if_changed()).await;
            }
        });
    }
}

fn ok_label(ok: bool) -> crate::telemetry::metrics::OutcomeLabels {
    crate::telemetry::metrics::OutcomeLabels {
        outcome: if ok { "loaded" } else { "refused" },
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A chain (leaf first) and its private key from files, checked to belong
/// together.
fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let private = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    certified_key(&chain, &private).with_context(|| {
        format!(
            "{} and {} do not make a usable pair",
            cert.display(),
            key.display()
        )
    })
}

/// A chain (leaf first) and its private key, as PEM, checked to belong
/// together.
fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the certificate file is not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err(anyhow!("the certificate file holds no certificate"));
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| anyhow!("the key file holds no private key: {e}"))?;
    let key = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| anyhow!("{e}"))?;
    validity(&key)?;
    Ok(key)
}

/// Notes that new connections now get `key`: counted, and its expiry in
/// the metrics (where an alert on the certificate in use looks).
fn taken_up(key: &CertifiedKey) {
    metrics().tls_reloads.get_or_create(&ok_label(true)).inc();
    note_expiry(key);
}

/// The expiry of the certificate in use, for the metrics.
fn note_expiry(key: &CertifiedKey) {
    if let Ok((_, not_after)) = validity(key) {
        let unix = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        metrics()
            .tls_certificate_expiry
            .set(i64::try_from(unix).unwrap_or(i64::MAX));
    }
}

/// Counts a new certificate that could not be used.
fn refused() {
    metrics().tls_reloads.get_or_create(&ok_label(false)).inc();
}

/// The leaf's notBefore and notAfter.
fn validity(key: &CertifiedKey) -> anyhow::Result<(SystemTime, SystemTime)> {
    let leaf = key.end_entity_cert().map_err(|e| anyhow!("{e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow!("the certificate cannot be read: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    };
    let v = cert.validity();
    Ok((at(v.not_before), at(v.not_after)))
}

/// Where the certificates come from.
pub enum Certificates {
    Files(Arc<CertFiles>),
    Acme(Arc<Acme>),
}

impl Certificates {
    /// Reads the files or the ACME cache, and starts what keeps the
    /// certificate current. Files that cannot be used are an error.
    pub fn start(server: &ServerConfig) -> anyhow::Result<Option<Self>> {
        if let Some(acme) = &server.acme {
            let acme = Acme::open(acme)?;
            acme.spawn();
            return Ok(Some(Self::Acme(acme)));
        }
        let Some(files) = &server.tls else {
            return Ok(None);
        };
        let certs = CertFiles::open(&files.cert, &files.key)?;
        certs.watch();
        Ok(Some(Self::Files(certs)))
    }

    /// The TLS side of the listener: HTTP/2 and HTTP/1.1 by ALPN (and
    /// ACME's challenges, with ACME).
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let (resolver, mut alpn): (Arc<dyn ResolvesServerCert>, _) = match self {
            Self::Files(files) => (files.clone(), Vec::new()),
            Self::Acme(acme) => (acme.clone(), vec![ACME_TLS.to_vec()]),
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        alpn.splice(0..0, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        config.alpn_protocols = alpn;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What became of a connection to the HTTPS port.
pub enum Accepted {
    Tls(Box<TlsStream<ClientIo>>),
    /// An ACME CA checked a challenge; there is nothing to serve it.
    AcmeChallenge,
    /// It speaks plain HTTP: tell it to use HTTPS.
    PlainHttp(ClientIo),
}

/// Runs the handshake within `timeout`. A client that sends plain HTTP to
/// the HTTPS port gets a plain `400` saying so instead of a dropped
/// connection (a mirror configured as `http://` is the common mistake).
pub async fn accept(
    acceptor: &TlsAcceptor,
    io: ClientIo,
    timeout: Duration,
) -> io::Result<Accepted> {
    let work = async {
        let mut first = [0u8; 1];
        // Waits for the first byte without taking it from the stream.
        let n = io.peek(&mut first).await?;
        if n == 1 && first[0] != HANDSHAKE_RECORD {
            return Ok(Accepted::PlainHttp(io));
        }
        let tls = acceptor.accept(io).await?;
        if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS) {
            return Ok(Accepted::AcmeChallenge);
        }
        Ok(Accepted::Tls(Box::new(tls)))
    };
    let result = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake")));
    let reason = match &result {
        Ok(Accepted::Tls(_) | Accepted::AcmeChallenge) => return result,
        Ok(Accepted::PlainHttp(_)) => "plain_http",
        Err(e) if e.kind() == io::ErrorKind::TimedOut => "timeout",
        Err(_) => "error",
    };
    metrics()
        .tls_handshake_failures
        .get_or_create(&crate::telemetry::metrics::ReasonLabels { reason })
        .inc();
    result
}

/// Answers a plain-HTTP client with [`PLAIN_HTTP_ANSWER`]. Its request is
/// read first and the connection drained after: closing with unread bytes
/// would reset the connection and lose the answer.
pub async fn refuse_plain_http(mut io: ClientIo) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut scratch = vec![0u8; 16 * 1024];
    let linger = Duration::from_secs(1);
    let _ = tokio::time::timeout(linger, io.read(&mut scratch)).await;
    if io.write_all(PLAIN_HTTP_ANSWER).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(linger, async {
        while matches!(io.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The whole answer to a plain-HTTP request on the HTTPS port.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Connection: close\r\n\
Content-Length: 53\r\n\
\r\n\
This port speaks HTTPS: use https:// for this mirror\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_has_the_length_it_says() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
