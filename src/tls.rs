//! TLS: the public listener's certificate, the trust roots of https:// upstreams, and the
//! rustls configurations built from them.
//!
//! Certificates and keys are parsed here from PEM bytes the config module has read, once, when
//! the config is validated: `keycard check` and a reload refuse a file whose certificate is
//! unreadable, empty or does not match its key, and the running one stays. The parsed
//! [`ServerCert`] lives in the config and so in the compiled policy; the listener's rustls
//! configuration asks the policy in force for it on every handshake (see
//! [`crate::server`]), so a reload reaches new connections and leaves open ones alone.
//!
//! Everything uses the ring provider, the one hyper-rustls already brings; no key material
//! ever reaches a `Debug` impl or an error message.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The protocols the public listener offers in ALPN, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The one crypto provider keycard uses (explicit, so no process-wide default is needed).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which of the two files of `[server.tls]` a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// `server.tls.cert_file`.
    Cert,
    /// `server.tls.key_file`.
    Key,
}

/// The listener's certificate chain and private key, checked to belong together. The key
/// is never shown: `Debug` names the chain's length only.
#[derive(Clone)]
pub struct ServerCert(Arc<CertifiedKey>);

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("certificates", &self.0.cert.len())
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Parses a certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 RSA or
    /// SEC1 EC, in PEM), and proves the key is the certificate's. The error says which file
    /// is wrong and why, never quoting the key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerCert, (TlsFile, String)> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (TlsFile::Cert, format!("not a valid PEM file: {e}")))?;
        if chain.is_empty() {
            return Err((
                TlsFile::Cert,
                "no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks, leaf first)"
                    .to_owned(),
            ));
        }
        // pem errors can quote a line of the file: not for a key file.
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
            (
                TlsFile::Key,
                "no private key in the file (expected PEM: \"PRIVATE KEY\" (PKCS#8), \
                 \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")"
                    .to_owned(),
            )
        })?;
        let signer = provider().key_provider.load_private_key(key).map_err(|_| {
            (
                TlsFile::Key,
                "unsupported private key (use RSA of 2048 bits or more, ECDSA P-256/P-384, \
                 or Ed25519)"
                    .to_owned(),
            )
        })?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => Ok(ServerCert(Arc::new(certified))),
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err((
                TlsFile::Key,
                "does not match the certificate (the first one in server.tls.cert_file)".to_owned(),
            )),
            // The key cannot say what its public half is: nothing to compare, the handshake
            // will tell.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(ServerCert(Arc::new(certified)))
            }
            Err(e) => Err((
                TlsFile::Cert,
                format!("the first certificate is not a valid X.509 certificate: {e}"),
            )),
        }
    }

    /// The chain and key, as a rustls resolver hands them to a handshake.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0)
    }
}

/// The certificate authorities a route's `ca_file` names: an https:// upstream of that route
/// must chain to one of them (and to nothing else).
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamCa(Arc<[CertificateDer<'static>]>);

impl fmt::Debug for UpstreamCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamCa")
            .field("certificates", &self.0.len())
            .finish()
    }
}

impl UpstreamCa {
    /// Parses every certificate in `pem`; at least one, each usable as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<UpstreamCa, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a valid PEM file: {e}"))?;
        if certs.is_empty() {
            return Err(
                "no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks)".into(),
            );
        }
        let mut store = RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store
                .add(cert.clone())
                .map_err(|e| format!("certificate {} is not a usable CA: {e}", i + 1))?;
        }
        Ok(UpstreamCa(certs.into()))
    }
}

/// The client side for upstreams: verifies the upstream's certificate and name (SNI is the
/// upstream's host) against `ca` alone when given, else against the Mozilla roots compiled
/// in. No ALPN: upstream requests are HTTP/1.1.
pub fn client_config(ca: Option<&UpstreamCa>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    match ca {
        // Each was added once already in `UpstreamCa::from_pem`.
        Some(ca) => {
            let _ = roots.add_parsable_certificates(ca.0.iter().cloned());
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The listener's side: no client certificates, ALPN [`ALPN`], and the certificate chosen
/// per handshake by `certs` (so a reload reaches new connections without a new config).
pub fn server_config(certs: Arc<dyn rustls::server::ResolvesServerCert>) -> ServerConfig {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config
}
