//! Certificates from an ACME CA (RFC 8555; Let's Encrypt by default),
//! proved by TLS-ALPN-01 (RFC 8737) on the serving port itself: the CA
//! connects asking for `acme-tls/1`, and gets a certificate made for the
//! challenge instead of the real one.
//!
//! The account, the certificate and its key are kept in the cache
//! directory, so a restart does not ask the CA again (the CA limits how
//! often it issues for the same names). A certificate is renewed when a
//! third of its lifetime is left; a failed attempt is retried with backoff,
//! while the current certificate, if any, goes on being served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::Digest as _;

use crate::config::AcmeConfig;

/// The ALPN protocol of TLS-ALPN-01 challenges.
pub const ACME_TLS: &[u8] = b"acme-tls/1";

/// Waits between failed attempts: the CA counts failed validations.
const FIRST_RETRY: Duration = Duration::from_secs(60);
const LAST_RETRY: Duration = Duration::from_secs(3600);
/// Longest an order may take, challenges and all.
const ORDER_DEADLINE: Duration = Duration::from_secs(600);
/// Longest sleep between looks at the certificate (clocks drift, hosts
/// sleep).
const LOOK_EVERY: Duration = Duration::from_secs(6 * 3600);

pub struct Acme {
    config: AcmeConfig,
    current: RwLock<Option<Served>>,
    /// Challenge certificates by the name they prove.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.config.domains)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Served {
    key: Arc<CertifiedKey>,
    /// When to get the next one.
    renew_at: SystemTime,
}

impl Acme {
    /// Prepares the cache directory and takes up the certificate kept
    /// there, if it is for these names from this CA and still valid.
    pub fn open(config: &AcmeConfig) -> anyhow::Result<Arc<Self>> {
        create_private_dir(&config.cache)?;
        let acme = Arc::new(Self {
            config: config.clone(),
            current: RwLock::new(None),
            challenges: Mutex::new(HashMap::new()),
        });
        let (cert, key) = acme.cert_files();
        if cert.exists() && key.exists() {
            match served(&std::fs::read(&cert)?, &std::fs::read(&key)?) {
                Ok(s) => {
                    if s.renew_at > SystemTime::now() {
                        tracing::info!(cert = %cert.display(), "TLS certificate from the ACME cache");
                    } else {
                        // Still served while the renewal runs.
                        tracing::info!("the cached ACME certificate is due for renewal");
                    }
                    super::note_expiry(&s.key);
                    *acme.current.write().unwrap_or_else(PoisonError::into_inner) = Some(s);
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "ignoring the cached ACME certificate"
                ),
            }
        }
        Ok(acme)
    }

    /// Obtains and renews the certificate for as long as `self` is held
    /// elsewhere.
    pub fn spawn(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut retry = FIRST_RETRY;
            loop {
                let Some(acme) = weak.upgrade() else { return };
                let due = acme
                    .current
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|s| s.renew_at);
                let wait = match due.map(|t| t.duration_since(SystemTime::now())) {
                    Some(Ok(left)) => left.min(LOOK_EVERY),
                    // Due, or none yet.
                    // The client sets no deadline of its own on the CA's
                    // answers: one that never comes must not stop renewals.
                    _ => match tokio::time::timeout(ORDER_DEADLINE, acme.obtain())
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("the CA took over {ORDER_DEADLINE:?}")))
                    {
                        Ok(()) => {
                            retry = FIRST_RETRY;
                            continue;
                        }
                        Err(e) => {
                            super::refused();
                            tracing::warn!(
                                error = format!("{e:#}"),
                                retry_in = ?retry,
                                "cannot get a certificate from the ACME CA"
                            );
                            let wait = retry;
                            retry = (retry * 2).min(LAST_RETRY);
                            wait
                        }
                    },
                };
                drop(acme);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// One order: the challenges answered, the certificate fetched, kept in
    /// the cache and served.
    async fn obtain(&self) -> anyhow::Result<()> {
        tracing::info!(domains = ?self.config.domains, directory = %self.config.directory, "asking the ACME CA for a certificate");
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("placing the order")?;
        let mut answering = Answering(&self.challenges);
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("reading an authorization")?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let name = authz.identifier().to_string();
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| anyhow!("the CA offers no tls-alpn-01 challenge for {name}"))?;
            let answer = challenge_cert(&name, challenge.key_authorization().digest().as_ref())?;
            answering.insert(name, answer);
            challenge
                .set_ready()
                .await
                .context("answering a challenge")?;
        }
        let patience = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&patience).await;
        drop(answering);
        match status.context("waiting for the CA to validate")? {
            OrderStatus::Ready => {}
            other => return Err(anyhow!("the order is {other:?}, not ready")),
        }
        let key_pem = order.finalize().await.context("finalizing the order")?;
        let chain_pem = order
            .poll_certificate(&patience)
            .await
            .context("fetching the certificate")?;
        let s = served(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let (cert, key) = self.cert_files();
        let kept = cert.clone();
        tokio::task::spawn_blocking(move || {
            write_private(&key, key_pem.as_bytes())?;
            write_private(&cert, chain_pem.as_bytes())
        })
        .await
        .context("writing the certificate")??;
        super::taken_up(&s.key);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(s);
        let cert = kept;
        tracing::info!(cert = %cert.display(), "new TLS certificate from the ACME CA");
        Ok(())
    }

    /// The account kept in the cache for this directory, or a new one.
    async fn account(&self) -> anyhow::Result<Account> {
        let path = self.config.cache.join(format!(
            "account-{}.json",
            short_hash(&[self.config.directory.as_str()])
        ));
        let builder = || match &self.config.directory_ca {
            Some(ca) => Account::builder_with_root(ca)
                .with_context(|| format!("reading server.acme.directory_ca {}", ca.display())),
            None => Account::builder().context("setting up the ACME client"),
        };
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read(path)).await?
        };
        if let Ok(text) = read {
            let credentials: AccountCredentials = serde_json::from_slice(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            return builder()?
                .from_credentials(credentials)
                .await
                .context("restoring the ACME account");
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .context("creating the ACME account")?;
        let text = serde_json::to_vec(&credentials)?;
        tokio::task::spawn_blocking(move || write_private(&path, &text)).await??;
        Ok(account)
    }

    /// The certificate and key files for this CA and these names: another
    /// directory or list of names is another certificate.
    fn cert_files(&self) -> (PathBuf, PathBuf) {
        let mut parts = vec![self.config.directory.as_str()];
        parts.extend(self.config.domains.iter().map(String::as_str));
        let id = short_hash(&parts);
        (
            self.config.cache.join(format!("cert-{id}.pem")),
            self.config.cache.join(format!("key-{id}.pem")),
        )
    }
}

/// The challenge certificates of one order, withdrawn when it ends however
/// it ends.
struct Answering<'a>(&'a Mutex<HashMap<String, Arc<CertifiedKey>>>);

impl Answering<'_> {
    fn insert(&mut self, name: String, answer: Arc<CertifiedKey>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, answer);
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl ResolvesServerCert for Acme {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let challenge = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS));
        if challenge {
            let name = hello.server_name()?;
            return self
                .challenges
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name)
                .cloned();
        }
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|s| s.key.clone())
    }
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge: the
/// name, and the digest of the key authorization in the acmeIdentifier
/// extension.
fn challenge_cert(name: &str, digest: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = super::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| anyhow!("loading a challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

fn served(chain_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Served> {
    let key = super::certified_key(chain_pem, key_pem)?;
    let (not_before, not_after) = super::validity(&key)?;
    if not_after <= SystemTime::now() {
        return Err(anyhow!("the certificate has expired"));
    }
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    Ok(Served {
        key: Arc::new(key),
        renew_at: not_after - lifetime / 3,
    })
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6])
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the ACME cache {}", dir.display()))
}

/// Writes `bytes` to `path` readable by this user only, whole or not at
/// all (a temporary file renamed into place).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover from an interrupted write would keep its own mode.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", tmp.display()));
        }
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
