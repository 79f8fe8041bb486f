//! A throwaway PKI for a test control plane: one CA, the API server's serving certificate, an admin client
//! certificate (group `system:masters`) and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the PEM files [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (also the client CA the API server trusts).
    pub ca_cert: PathBuf,
    /// CA private key (the controller manager signs CSRs with it).
    pub ca_key: PathBuf,
    /// API server serving certificate.
    pub server_cert: PathBuf,
    /// API server serving key.
    pub server_key: PathBuf,
    /// Admin client certificate.
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Service-account token signing key (private).
    pub sa_key: PathBuf,
    /// Service-account token verification key (public).
    pub sa_pub: PathBuf,
}

/// Errors while generating the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn write(dir: &Path, name: &str, pem: &str) -> Result<PathBuf, PkiError> {
    let path = dir.join(name);
    std::fs::write(&path, pem).map_err(|source| PkiError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Generates the PKI into `dir`. The serving certificate is valid for loopback and the in-cluster names.
pub fn generate(dir: &Path) -> Result<Pki, PkiError> {
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "caracal-e2e-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "10.96.0.1".to_owned(),
        crate::controlplane::ADVERTISED_ADDRESS.to_string(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "caracal-e2e-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    let sa_key = KeyPair::generate()?;

    Ok(Pki {
        ca_cert: write(dir, "ca.crt", &ca.pem())?,
        ca_key: write(dir, "ca.key", &ca_key_pem)?,
        server_cert: write(dir, "apiserver.crt", &server_cert.pem())?,
        server_key: write(dir, "apiserver.key", &server_key.serialize_pem())?,
        admin_cert: write(dir, "admin.crt", &admin_cert.pem())?,
        admin_key: write(dir, "admin.key", &admin_key.serialize_pem())?,
        sa_key: write(dir, "sa.key", &sa_key.serialize_pem())?,
        sa_pub: write(dir, "sa.pub", &sa_key.public_key_pem())?,
    })
}

/// Certificates for Typha's mutual TLS in tests and benchmarks: a CA, the server (`caracal-typha`, also as a
/// DNS SAN), a node agent client (`caracal-node`) and a client with the wrong identity (`intruder`).
/// Each pair is (certificate PEM, key PEM).
#[derive(Clone, Debug)]
pub struct TyphaPki {
    /// The CA certificate.
    pub ca: String,
    /// Typha's server certificate and key.
    pub server: (String, String),
    /// A node agent's client certificate and key.
    pub node: (String, String),
    /// A client certificate with the wrong identity.
    pub intruder: (String, String),
}

impl TyphaPki {
    /// Generates the set.
    pub fn generate() -> Result<Self, PkiError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "caracal-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
        let leaf = |cn: &str,
                    sans: Vec<String>,
                    eku: ExtendedKeyUsagePurpose|
         -> Result<(String, String), PkiError> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(sans)?;
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            Ok((p.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        Ok(TyphaPki {
            server: leaf(
                "caracal-typha",
                vec!["caracal-typha".into()],
                ExtendedKeyUsagePurpose::ServerAuth,
            )?,
            node: leaf("caracal-node", vec![], ExtendedKeyUsagePurpose::ClientAuth)?,
            intruder: leaf("intruder", vec![], ExtendedKeyUsagePurpose::ClientAuth)?,
            ca: ca.pem(),
        })
    }

    /// Writes `ca.crt`, `typha.crt`, `typha.key`, `node.crt`, `node.key` into `dir` (its own directory: not
    /// a control plane's, whose `ca.crt` is the API server's client CA) and returns their paths in that order.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 5], PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_owned(),
            source,
        })?;
        Ok([
            write(dir, "ca.crt", &self.ca)?,
            write(dir, "typha.crt", &self.server.0)?,
            write(dir, "typha.key", &self.server.1)?,
            write(dir, "node.crt", &self.node.0)?,
            write(dir, "node.key", &self.node.1)?,
        ])
    }
}

/// The control plane's CA, read back from its files, to sign with.
fn ca_issuer(pki: &Pki) -> Result<rcgen::Issuer<'static, KeyPair>, PkiError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| PkiError::Write {
            path: p.to_owned(),
            source,
        })
    };
    let ca_key = KeyPair::from_pem(&read(&pki.ca_key)?)?;
    Ok(rcgen::Issuer::from_ca_cert_pem(&read(&pki.ca_cert)?, ca_key)?)
}

/// A client certificate and key (PEM) signed by the control plane's CA: common name `cn`, organisation
/// `org` (the API server's user and group, e.g. `system:node:NAME` in `system:nodes` for a kubelet, which the
/// Node authorizer then confines to its own node).
pub fn client_cert(pki: &Pki, cn: &str, org: &str) -> Result<(String, String), PkiError> {
    let ca = ca_issuer(pki)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok((p.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
}

/// A serving certificate and key (PEM) signed by the control plane's CA for `ips` (a kubelet's, so that the
/// API server's `logs` and `exec` reach it over verified TLS).
pub fn serving_cert(pki: &Pki, cn: &str, ips: &[std::net::IpAddr]) -> Result<(String, String), PkiError> {
    let ca = ca_issuer(pki)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(ips.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok((p.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
}
