//! The serving certificate: loaded from PEM files, swapped in place when the files change, and
//! generated for clusters without cert-manager (`ckptd webhook gen-cert`).
//!
//! Files are polled rather than watched: Kubernetes updates a mounted Secret by swapping a symlink,
//! which inotify watchers on the file miss, and cert-manager renews at most a few times a year, so a
//! read of two small files every few seconds is both simpler and sure to see the change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{Error, Result};

/// The certificate and key files, and the pair currently served.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    key: Arc<CertifiedKey>,
}

impl CertStore {
    /// Loads the pair; a missing, unreadable or mismatched pair is a configuration error (exit 64).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertStore>> {
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(&cert_pem, &key_pem)
            .map_err(|reason| Error::Config { what: format!("--tls-cert {}", cert_path.display()), reason })?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Loaded { cert_pem, key_pem, key }),
        }))
    }

    /// Re-reads the files and swaps the pair in when they changed and form a valid pair. Returns whether
    /// it swapped. A half-written rotation (new certificate, old key) is an error and keeps the old pair,
    /// so handshakes never fail because of a rotation in progress; the next poll picks up the finished one.
    pub fn reload(&self) -> Result<bool> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path)?;
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if cur.cert_pem == cert_pem && cur.key_pem == key_pem {
                return Ok(false);
            }
        }
        let key = certified_key(&cert_pem, &key_pem)
            .map_err(|reason| Error::Config { what: format!("--tls-cert {}", self.cert_path.display()), reason })?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Loaded { cert_pem, key_pem, key };
        Ok(true)
    }

    /// Polls the files every `interval` until `shutdown` resolves. Failures are logged and retried.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let store = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(true)) => tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "serving certificate not reloaded, keeping the current one"),
                Err(e) => tracing::warn!(error = %e, "certificate reload task failed"),
            }
        }
    }

    /// A rustls server configuration that asks this store for the certificate on every handshake, so a
    /// reload takes effect on the next connection without restarting the listener.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>> {
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config { what: "TLS".into(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No session resumption: a resumed session skips the certificate, so a client could keep
        // talking under a certificate that has since been rotated out. The API server makes few,
        // long-lived connections, so full handshakes cost nothing that matters.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()).key))
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let read = |flag: &str, p: &Path| std::fs::read(p).map_err(|e| Error::unreadable(flag, p, &e));
    Ok((read("--tls-cert", cert)?, read("--tls-key", key)?))
}

/// Parses a PEM chain and key and checks that the key belongs to the leaf certificate.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> std::result::Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("cannot parse the certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("cannot parse the private key PEM: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| format!("the key does not match the certificate or is unsupported: {e}"))?;
    Ok(Arc::new(ck))
}

/// The files `gen-cert` writes.
#[derive(Debug, Clone)]
pub struct GeneratedCert {
    /// The CA certificate (PEM): the webhook configuration's `caBundle`, base64-encoded.
    pub ca_pem: String,
    /// The serving certificate (PEM).
    pub cert_pem: String,
    /// The serving key (PEM, PKCS#8).
    pub key_pem: String,
}

/// The longest validity `gen-cert` issues, in days (100 years). X.509 dates end at the year 9999,
/// and a serving certificate that outlives its cluster protects nothing.
pub const MAX_CERT_DAYS: u32 = 36_500;

/// Generates a CA and a serving certificate for `service.namespace.svc`, valid for `days` days
/// (1 to [`MAX_CERT_DAYS`]). Each run makes a new CA, so the caBundle must be updated together
/// with the Secret.
pub fn generate(service: &str, namespace: &str, days: u32) -> Result<GeneratedCert> {
    let fail = |reason: String| Error::Config { what: "gen-cert".into(), reason };
    if !(1..=MAX_CERT_DAYS).contains(&days) {
        return Err(Error::Config {
            what: "gen-cert --days".into(),
            reason: format!("{days} is outside 1..={MAX_CERT_DAYS} (100 years): rotate certificates instead"),
        });
    }
    let now = std::time::SystemTime::now();
    let not_after = now + Duration::from_secs(u64::from(days) * 86_400);
    let ca_key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(e.to_string()))?;
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("ckptd webhook CA ({namespace})"));
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    ca.not_before = now.into();
    ca.not_after = not_after.into();
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| fail(e.to_string()))?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut leaf = rcgen::CertificateParams::new(names).map_err(|e| fail(e.to_string()))?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, format!("{service}.{namespace}.svc"));
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now.into();
    leaf.not_after = not_after.into();
    let cert = leaf.signed_by(&key, &issuer).map_err(|e| fail(e.to_string()))?;
    Ok(GeneratedCert { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}
