//! Typha's mutual-TLS material: a CA kept in the Secret `caracal-ca`, a server certificate for Typha
//! (identity `caracal-typha`) and a client certificate for node agents (identity `caracal-node`).
//!
//! Generated in-process with rcgen; a certificate is replaced when it is missing, unreadable, not issued by
//! the current CA, or within [`RENEW_BEFORE`] of expiring. When the CA itself is replaced, the old CA stays
//! in the trust bundle until it expires, so agents and Typha replicas on either side keep talking.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::apply::FIELD_MANAGER;
use crate::render::{Certificates, NAMESPACE};

/// The Secret holding the CA key.
pub const CA_SECRET: &str = "caracal-ca";
/// Renew a certificate when less than this is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Errors managing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing a Secret failed.
    #[error("{0} Secret {1}: {2}")]
    Api(&'static str, String, kube::Error),
}

/// Facts about one PEM certificate.
#[derive(Debug, PartialEq, Eq)]
struct CertInfo {
    not_after: i64,
    subject_key_id: Option<Vec<u8>>,
    authority_key_id: Option<Vec<u8>>,
}

fn inspect(pem: &str) -> Option<CertInfo> {
    use x509_parser::extensions::ParsedExtension;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let mut info = CertInfo {
        not_after: cert.validity().not_after.timestamp(),
        subject_key_id: None,
        authority_key_id: None,
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => info.subject_key_id = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                info.authority_key_id = a.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            _ => {}
        }
    }
    Some(info)
}

fn fresh(info: &CertInfo, now: OffsetDateTime) -> bool {
    info.not_after - now.unix_timestamp() > i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX)
}

fn validity(params: &mut CertificateParams, now: OffsetDateTime, lifetime: Duration) {
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX));
}

fn ca_params(now: OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "caracal-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, now, CA_LIFETIME);
    Ok(p)
}

/// A leaf certificate and key signed by the CA.
fn leaf(
    ca_cert: &str,
    ca_key: &str,
    name: &str,
    server: bool,
    now: OffsetDateTime,
) -> Result<(String, String), rcgen::Error> {
    let sans = if server {
        vec![
            name.to_owned(),
            format!("{name}.{NAMESPACE}"),
            format!("{name}.{NAMESPACE}.svc"),
        ]
    } else {
        Vec::new()
    };
    signed(ca_cert, ca_key, name, sans, server, now)
}

/// A new self-signed CA (certificate, key) valid for ten years from `now`.
pub fn new_ca(now: OffsetDateTime) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = ca_params(now)?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// True when the PEM certificate parses and has more than [`RENEW_BEFORE`] left at `now`.
pub fn is_fresh(pem: &str, now: OffsetDateTime) -> bool {
    inspect(pem).is_some_and(|i| fresh(&i, now))
}

/// A certificate for `name` with `sans` (DNS names or IP addresses), signed by the CA, valid for a year.
pub fn signed(
    ca_cert: &str,
    ca_key: &str,
    name: &str,
    sans: Vec<String>,
    server: bool,
    now: OffsetDateTime,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, key)?;
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, now, LEAF_LIFETIME);
    let leaf_key = KeyPair::generate()?;
    let cert = p.signed_by(&leaf_key, &issuer)?;
    Ok((cert.pem(), leaf_key.serialize_pem()))
}

fn text(secret: Option<&Secret>, key: &str) -> Option<String> {
    let data = secret?.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

/// The decision part of [`ensure`]: given what the Secrets hold now, the material to use (new where needed).
/// Returns the certificates and, when the CA changed, the new CA Secret data to store.
pub fn plan(
    ca: Option<&Secret>,
    typha: Option<&Secret>,
    node: Option<&Secret>,
    now: OffsetDateTime,
) -> Result<(Certificates, Option<BTreeMap<String, String>>), rcgen::Error> {
    let current = text(ca, "ca.crt").zip(text(ca, "ca.key"));
    let usable = current
        .clone()
        .filter(|(c, _)| inspect(c).is_some_and(|i| fresh(&i, now)));
    let (ca_cert, ca_key, ca_update) = match usable {
        Some((c, k)) => (c, k, None),
        None => {
            let (c, k) = new_ca(now)?;
            let mut data =
                BTreeMap::from([("ca.crt".to_owned(), c.clone()), ("ca.key".to_owned(), k.clone())]);
            // Keep trusting the CA being replaced while it is still valid.
            if let Some((old, _)) =
                current.filter(|(c, _)| inspect(c).is_some_and(|i| i.not_after > now.unix_timestamp()))
            {
                data.insert("previous.crt".to_owned(), old);
            }
            (c, k, Some(data))
        }
    };
    let ca_id = inspect(&ca_cert).and_then(|i| i.subject_key_id);
    let keep = |s: Option<&Secret>| {
        let (cert, key) = (text(s, "tls.crt")?, text(s, "tls.key")?);
        let info = inspect(&cert)?;
        (fresh(&info, now) && info.authority_key_id.is_some() && info.authority_key_id == ca_id)
            .then_some((cert, key))
    };
    let (typha_cert, typha_key) = match keep(typha) {
        Some(pair) => pair,
        None => leaf(&ca_cert, &ca_key, "caracal-typha", true, now)?,
    };
    let (node_cert, node_key) = match keep(node) {
        Some(pair) => pair,
        None => leaf(&ca_cert, &ca_key, "caracal-node", false, now)?,
    };
    let previous = ca_update
        .as_ref()
        .and_then(|d| d.get("previous.crt").cloned())
        .or_else(|| text(ca, "previous.crt"));
    let bundle = match previous.filter(|p| inspect(p).is_some_and(|i| i.not_after > now.unix_timestamp())) {
        Some(p) => format!("{ca_cert}{p}"),
        None => ca_cert.clone(),
    };
    Ok((
        Certificates {
            ca_cert: bundle,
            typha_cert,
            typha_key,
            node_cert,
            node_key,
        },
        ca_update,
    ))
}

/// Reads the current material, renews what needs it, stores a new CA if one was made, and returns the
/// certificates for `render` (which writes the leaf Secrets and the CA bundle).
pub async fn ensure(client: &Client) -> Result<Certificates, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let get = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(name)
                .await
                .map_err(|e| CertError::Api("reading", name.to_owned(), e))
        }
    };
    let (ca, typha, node) = (
        get(CA_SECRET).await?,
        get("caracal-typha-certs").await?,
        get("caracal-node-certs").await?,
    );
    let (certs, ca_update) = plan(
        ca.as_ref(),
        typha.as_ref(),
        node.as_ref(),
        OffsetDateTime::now_utc(),
    )?;
    if let Some(data) = ca_update {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(NAMESPACE.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "caracal".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        let mut body = serde_json::to_value(&secret).unwrap_or_default();
        body["apiVersion"] = "v1".into();
        body["kind"] = "Secret".into();
        secrets
            .patch(
                CA_SECRET,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| CertError::Api("writing", CA_SECRET.to_owned(), e))?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn first_run_makes_a_ca_and_leaves_signed_by_it() {
        let now = OffsetDateTime::now_utc();
        let (certs, ca) = plan(None, None, None, now).unwrap();
        let ca = ca.expect("a new CA is stored");
        assert_eq!(certs.ca_cert, ca["ca.crt"]);
        let ca_id = inspect(&certs.ca_cert).unwrap().subject_key_id;
        assert!(ca_id.is_some());
        assert_eq!(inspect(&certs.typha_cert).unwrap().authority_key_id, ca_id);
        assert_eq!(inspect(&certs.node_cert).unwrap().authority_key_id, ca_id);
    }

    #[test]
    fn valid_material_is_kept_as_is() {
        let now = OffsetDateTime::now_utc();
        let (certs, ca) = plan(None, None, None, now).unwrap();
        let ca = ca.unwrap();
        let ca_secret = secret(&[("ca.crt", &ca["ca.crt"]), ("ca.key", &ca["ca.key"])]);
        let typha = secret(&[("tls.crt", &certs.typha_cert), ("tls.key", &certs.typha_key)]);
        let node = secret(&[("tls.crt", &certs.node_cert), ("tls.key", &certs.node_key)]);
        let (again, update) = plan(Some(&ca_secret), Some(&typha), Some(&node), now).unwrap();
        assert!(update.is_none());
        assert_eq!(again, certs);
    }

    #[test]
    fn leaves_are_renewed_before_expiry_and_the_ca_before_its_own() {
        let now = OffsetDateTime::now_utc();
        let (certs, ca) = plan(None, None, None, now).unwrap();
        let ca = ca.unwrap();
        let ca_secret = secret(&[("ca.crt", &ca["ca.crt"]), ("ca.key", &ca["ca.key"])]);
        let typha = secret(&[("tls.crt", &certs.typha_cert), ("tls.key", &certs.typha_key)]);
        // 340 days on, the one-year leaves are inside the renewal window; the ten-year CA is not.
        let later = now + time::Duration::days(340);
        let (renewed, update) = plan(Some(&ca_secret), Some(&typha), None, later).unwrap();
        assert!(update.is_none());
        assert_ne!(renewed.typha_cert, certs.typha_cert);
        // Nine years and eleven months on, the CA is renewed and the old one stays in the bundle.
        let much_later = now + time::Duration::days(10 * 365 - 20);
        let (rotated, update) = plan(Some(&ca_secret), None, None, much_later).unwrap();
        let update = update.expect("a new CA");
        assert_eq!(update["previous.crt"], ca["ca.crt"]);
        assert!(rotated.ca_cert.contains(&ca["ca.crt"]) && rotated.ca_cert.starts_with(&update["ca.crt"]));
    }

    #[test]
    fn a_leaf_from_another_ca_is_replaced() {
        let now = OffsetDateTime::now_utc();
        let (a, ca_a) = plan(None, None, None, now).unwrap();
        let (_, ca_b) = plan(None, None, None, now).unwrap();
        let ca_b = ca_b.unwrap();
        let ca_secret = secret(&[("ca.crt", &ca_b["ca.crt"]), ("ca.key", &ca_b["ca.key"])]);
        let foreign = secret(&[("tls.crt", &a.node_cert), ("tls.key", &a.node_key)]);
        let (certs, _) = plan(Some(&ca_secret), None, Some(&foreign), now).unwrap();
        assert_ne!(certs.node_cert, a.node_cert);
        assert!(ca_a.is_some());
    }
}
