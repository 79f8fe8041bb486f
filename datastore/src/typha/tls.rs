//! Mutual TLS for Typha: both sides present certificates from the CA the operator issues, and each checks
//! the other's identity (common name or a DNS SAN), not the address it connected to.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input did not parse.
    #[error("{what}: {message}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        what,
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        message: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA", ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The server side: requires a client certificate signed by the CA.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs("server certificate", cert_pem)?, key(key_pem)?)?;
    Ok(Arc::new(cfg))
}

/// The client side: presents its certificate and trusts only the CA.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs("client certificate", cert_pem)?, key(key_pem)?)?;
    Ok(Arc::new(cfg))
}

/// The identities a certificate carries: its common name, its DNS names and its URI names.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d)
                | x509_parser::extensions::GeneralName::URI(d) => {
                    out.push((*d).to_owned());
                }
                _ => {}
            }
        }
    }
    out
}
