//! The public listener's certificate: loaded and checked by us (Pingora's
//! own loader panics on bad files) and served through a resolver whose key
//! pair can be swapped while the listener runs.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which of the two files a [`KeyPairError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPairFile {
    Cert,
    Key,
}

#[derive(Debug)]
pub struct KeyPairError {
    pub file: KeyPairFile,
    pub message: String,
}

impl fmt::Display for KeyPairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Reads a PEM certificate chain and private key and checks that they
/// belong together.
pub fn load_key_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, KeyPairError> {
    let fail = |file, message: String| KeyPairError { file, message };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(KeyPairFile::Cert, pem_message(cert, "certificate", &e)))?;
    if chain.is_empty() {
        let msg = format!("no PEM certificate found in {}", cert.display());
        return Err(fail(KeyPairFile::Cert, msg));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| fail(KeyPairFile::Key, pem_message(key, "private key", &e)))?;
    let provider = crypto_provider();
    let pair = CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        let msg = format!(
            "private key {} does not fit certificate {}: {e}",
            key.display(),
            cert.display()
        );
        fail(KeyPairFile::Key, msg)
    })?;
    Ok(Arc::new(pair))
}

fn pem_message(path: &Path, what: &str, e: &rustls_pki_types::pem::Error) -> String {
    format!("cannot read {what} from {}: {e}", path.display())
}

/// The process-wide rustls provider (ring, the one Pingora installs).
fn crypto_provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .expect("a default crypto provider was just installed")
}

/// Hands out the current key pair to every handshake; [`CertStore::replace`]
/// rotates it without touching the listener.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    pub fn new(pair: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::new(pair),
        })
    }

    pub fn replace(&self, pair: Arc<CertifiedKey>) {
        self.current.store(pair);
    }

    /// TLS 1.2 and 1.3 (Pingora's rustls defaults), ALPN h2 then http/1.1.
    /// `cert`/`key` are recorded by Pingora but the resolver takes precedence.
    pub fn listener_settings(self: &Arc<Self>, cert: &Path, key: &Path) -> TlsSettings {
        let mut settings =
            TlsSettings::intermediate(&cert.to_string_lossy(), &key.to_string_lossy())
                .expect("intermediate() only records the paths");
        settings.set_cert_resolver(self.clone());
        settings.enable_h2();
        settings
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
