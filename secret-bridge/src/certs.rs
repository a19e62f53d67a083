//! TLS without cert-manager: a CA and a serving certificate made once, shared by every replica
//! through a Secret written with optimistic concurrency, renewed before expiry, and the CA
//! published as ConfigMap `secret-bridge-ca` (key `ca.crt`) for the ClusterSecretStore's
//! `caProvider`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hearth_runtime::events::{EventPublisher, EventType};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::tls::CurrentCertificate;

pub const SECRET_NAME: &str = "secret-bridge-tls";
pub const CA_CONFIG_MAP: &str = "secret-bridge-ca";
const FIELD_MANAGER: &str = "hearth-secret-bridge";
const NOT_AFTER: &str = "hearth.dev/not-after";
const CA_NOT_AFTER: &str = "hearth.dev/ca-not-after";
const SANS: &str = "hearth.dev/sans";
const CA_NAME: &str = "hearth secret-bridge CA";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "hearth-secret-bridge";
const CA_LIFETIME: time::Duration = time::Duration::days(3650);
const LEAF_LIFETIME: time::Duration = time::Duration::days(365);
/// A certificate with less than this left is replaced.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// How often the Secret is looked at again: for renewal, and for a renewal by another replica.
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// How long to wait before trying again when no certificate could be had at start.
const RETRY_START: Duration = Duration::from_secs(30);

/// The names a client may use for the bridge: its Service (and the SDK server's old name, for
/// drop-in use behind a Service of that name), loopback, and any extra names given.
pub fn subject_alt_names(namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for service in ["secret-bridge", "bitwarden-sdk-server"] {
        names.push(service.to_owned());
        names.push(format!("{service}.{namespace}"));
        names.push(format!("{service}.{namespace}.svc"));
        names.push(format!("{service}.{namespace}.svc.cluster.local"));
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
    names.extend(
        extra
            .iter()
            .map(|name| name.trim().to_owned())
            .filter(|n| !n.is_empty()),
    );
    names.sort();
    names.dedup();
    names
}

fn tls_error(error: impl std::fmt::Display) -> Error {
    Error::Config(format!("making the TLS certificate: {error}"))
}

fn kube_error(action: &'static str) -> impl Fn(kube::Error) -> Error {
    move |error| Error::Config(format!("Kubernetes API, {action}: {error}"))
}

fn ca_params(not_after: OffsetDateTime) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = not_after;
    Ok(params)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_time(text: Option<&String>) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text?, &time::format_description::well_known::Rfc3339).ok()
}

/// What the Secret holds, as text.
struct Material {
    ca_cert: String,
    ca_key: String,
    cert: String,
    key: String,
    ca_not_after: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// Whether a Secret or ConfigMap carries the label hearth puts on what it makes.
fn made_by_us(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_BY_LABEL))
        .is_some_and(|value| value == MANAGED_BY)
}

impl Material {
    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        let annotations = secret.metadata.annotations.as_ref();
        let time = |key: &str| parse_time(annotations?.get(key));
        Some(Self {
            ca_cert: text("ca.crt")?,
            ca_key: text("ca.key")?,
            cert: text("tls.crt")?,
            key: text("tls.key")?,
            // Only a hint for when to make a new CA; every check below reads the certificates.
            ca_not_after: time(CA_NOT_AFTER).unwrap_or(OffsetDateTime::UNIX_EPOCH),
            not_after: time(NOT_AFTER).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
    }

    /// Checks the certificates themselves, not what the annotations say of them: the key is
    /// the certificate's, the certificate chains to `ca.crt`, names every one of `names`, and
    /// is still valid past the renewal margin. `Err` says what is wrong.
    fn check(&self, names: &[String]) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::pem::PemObject;
        let certified = self.certified_key().map_err(|e| e.to_string())?;
        certified
            .keys_match()
            .map_err(|_| "tls.key is not the key of tls.crt".to_owned())?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_cert.as_bytes()) {
            let ca = ca.map_err(|_| "ca.crt is not a PEM certificate".to_owned())?;
            roots
                .add(ca)
                .map_err(|e| format!("ca.crt is not a usable CA certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("ca.crt: {e}"))?;
        let (leaf, intermediates) = certified
            .cert
            .split_first()
            .ok_or_else(|| "tls.crt holds no certificate".to_owned())?;
        let margin = std::time::SystemTime::now()
            .checked_add(Duration::from_secs(
                u64::try_from(RENEW_BEFORE.whole_seconds()).unwrap_or(0),
            ))
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .ok_or_else(|| "the clock is out of range".to_owned())?;
        let when = rustls_pki_types::UnixTime::since_unix_epoch(margin);
        for name in names {
            let server_name = rustls_pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| format!("{name:?} is not a DNS name or IP address"))?;
            verifier
                .verify_server_cert(leaf, intermediates, &server_name, &[], when)
                .map_err(|e| {
                    format!(
                        "tls.crt does not serve {name} through the next {} days: {e}",
                        RENEW_BEFORE.whole_days()
                    )
                })?;
        }
        Ok(())
    }

    /// A new serving certificate, from the existing CA if it has years left and its key
    /// really signs for it, else from a new CA.
    fn renew(previous: Option<&Self>, names: &[String]) -> Result<Self, Error> {
        if let Some(previous) = previous
            && let Ok(issued) = Self::issue(Some(previous), names)
            && issued.check(names).is_ok()
        {
            return Ok(issued);
        }
        let issued = Self::issue(None, names)?;
        issued.check(names).map_err(tls_error)?;
        Ok(issued)
    }

    fn issue(previous: Option<&Self>, names: &[String]) -> Result<Self, Error> {
        let now = OffsetDateTime::now_utc();
        let reusable = previous.filter(|p| p.ca_not_after - now > LEAF_LIFETIME + RENEW_BEFORE);
        let (ca_key, ca_cert, ca_not_after) = match reusable {
            Some(previous) => (
                KeyPair::from_pem(&previous.ca_key).map_err(tls_error)?,
                previous.ca_cert.clone(),
                previous.ca_not_after,
            ),
            None => {
                let key = KeyPair::generate().map_err(tls_error)?;
                let not_after = now + CA_LIFETIME;
                let cert = ca_params(not_after)?.self_signed(&key).map_err(tls_error)?;
                (key, cert.pem(), not_after)
            }
        };
        let ca_key_pem = ca_key.serialize_pem();
        // The same name and key make an issuer whose signatures the published CA verifies.
        let issuer = Issuer::new(ca_params(ca_not_after)?, ca_key);
        let mut leaf = CertificateParams::new(names.to_vec()).map_err(tls_error)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "secret-bridge");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf.not_before = now - time::Duration::hours(1);
        leaf.not_after = now + LEAF_LIFETIME;
        let key = KeyPair::generate().map_err(tls_error)?;
        let cert = leaf.signed_by(&key, &issuer).map_err(tls_error)?;
        Ok(Self {
            ca_cert,
            ca_key: ca_key_pem,
            cert: cert.pem(),
            key: key.serialize_pem(),
            ca_not_after,
            not_after: leaf.not_after,
        })
    }

    fn secret(&self, names: &[String], metadata: ObjectMeta) -> Secret {
        let data: BTreeMap<String, ByteString> = [
            ("ca.crt", &self.ca_cert),
            ("ca.key", &self.ca_key),
            ("tls.crt", &self.cert),
            ("tls.key", &self.key),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), ByteString(value.clone().into_bytes())))
        .collect();
        let mut metadata = metadata;
        metadata.name = Some(SECRET_NAME.to_owned());
        metadata
            .labels
            .get_or_insert_default()
            .insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        let annotations = metadata.annotations.get_or_insert_default();
        annotations.insert(NOT_AFTER.into(), rfc3339(self.not_after));
        annotations.insert(CA_NOT_AFTER.into(), rfc3339(self.ca_not_after));
        annotations.insert(SANS.into(), names.join(","));
        Secret {
            metadata,
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }

    fn certified_key(&self) -> Result<rustls::sign::CertifiedKey, Error> {
        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(tls_error)?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|_| tls_error("unreadable private key"))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(tls_error)?;
        Ok(rustls::sign::CertifiedKey::new(chain, signing))
    }
}

pub struct SelfManaged {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
    names: Vec<String>,
}

impl SelfManaged {
    pub fn new(client: Client, namespace: &str, names: Vec<String>) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            names,
        }
    }

    /// The certificate every replica serves: the one in the Secret if still good, else a new
    /// one written there. When two replicas race, the loser takes the winner's.
    async fn ensure(&self) -> Result<Material, Error> {
        for _ in 0..5 {
            let current = self
                .secrets
                .get_opt(SECRET_NAME)
                .await
                .map_err(kube_error("read TLS Secret"))?;
            if let Some(secret) = &current
                && !made_by_us(&secret.metadata)
            {
                return Err(self.foreign("Secret", SECRET_NAME));
            }
            let previous = current.as_ref().and_then(Material::from_secret);
            match previous.as_ref().map(|m| m.check(&self.names)) {
                Some(Ok(())) => {
                    self.publish_ca(previous.as_ref().map_or("", |m| &m.ca_cert))
                        .await?;
                    return previous.ok_or_else(|| tls_error("unreachable"));
                }
                Some(Err(why)) => {
                    tracing::warn!(reason = %why, "the TLS Secret's certificate cannot be served; issuing a new one");
                }
                None if current.is_some() => {
                    tracing::warn!("the TLS Secret lacks a key or certificate; issuing a new one");
                }
                None => {}
            }
            let material = Material::renew(previous.as_ref(), &self.names)?;
            let written = match current {
                None => {
                    let secret = material.secret(&self.names, ObjectMeta::default());
                    self.secrets.create(&PostParams::default(), &secret).await
                }
                Some(current) => {
                    let secret = material.secret(&self.names, current.metadata);
                    self.secrets
                        .replace(SECRET_NAME, &PostParams::default(), &secret)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    tracing::info!(
                        not_after = %rfc3339(material.not_after),
                        "issued a new serving certificate"
                    );
                    self.publish_ca(&material.ca_cert).await?;
                    return Ok(material);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(error) => return Err(kube_error("write TLS Secret")(error)),
            }
        }
        Err(Error::Config(
            "the TLS Secret kept changing under us".into(),
        ))
    }

    fn foreign(&self, kind: &'static str, name: &'static str) -> Error {
        Error::Foreign {
            kind,
            name,
            namespace: self.namespace.clone(),
        }
    }

    async fn publish_ca(&self, ca_cert: &str) -> Result<(), Error> {
        let existing = self
            .config_maps
            .get_opt(CA_CONFIG_MAP)
            .await
            .map_err(kube_error("read the CA ConfigMap"))?;
        if let Some(existing) = existing {
            if !made_by_us(&existing.metadata) {
                return Err(self.foreign("ConfigMap", CA_CONFIG_MAP));
            }
            let published = existing.data.as_ref().and_then(|d| d.get("ca.crt"));
            if published.map(String::as_str) == Some(ca_cert) {
                return Ok(());
            }
        }
        let config_map = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CA_CONFIG_MAP,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            },
            "data": {"ca.crt": ca_cert},
        });
        self.config_maps
            .patch(
                CA_CONFIG_MAP,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&config_map),
            )
            .await
            .map_err(kube_error("publish the CA"))?;
        Ok(())
    }

    /// Makes or loads the certificate, trying again every 30 s while it cannot (a foreign
    /// Secret in the way, the API unreachable), with the cause in the log and in an Event on the
    /// Secret; the API is not served meanwhile and /readyz says why. `None` on shutdown.
    pub async fn start_when_possible(
        &self,
        events: &EventPublisher,
        shutdown: &CancellationToken,
    ) -> Option<(Arc<CurrentCertificate>, String)> {
        loop {
            // The API may take a request and never answer: shutdown must not wait for it.
            let attempt = tokio::select! {
                () = shutdown.cancelled() => return None,
                attempt = self.start() => attempt,
            };
            let error = match attempt {
                Ok(started) => return Some(started),
                Err(error) => error,
            };
            tracing::error!(%error, "no certificate to serve yet; trying again in 30 s");
            let regarding = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Secret".to_owned()),
                name: Some(SECRET_NAME.to_owned()),
                namespace: Some(self.namespace.clone()),
                ..ObjectReference::default()
            };
            let reason = match error {
                Error::Foreign { .. } => "ForeignObject",
                _ => "CertificateUnavailable",
            };
            let note = error.to_string();
            let warn = events.publish(
                &regarding,
                EventType::Warning,
                reason,
                "KeepCertificate",
                &note,
            );
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = warn => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(RETRY_START) => {}
            }
        }
    }

    /// Makes or loads the certificate, for start-up.
    pub async fn start(&self) -> Result<(Arc<CurrentCertificate>, String), Error> {
        let material = self.ensure().await?;
        Ok((
            CurrentCertificate::new(material.certified_key()?),
            material.cert,
        ))
    }

    /// Checks the Secret every hour: renews before expiry, and serves what another replica
    /// renewed.
    pub async fn keep_fresh(
        self,
        certificate: Arc<CurrentCertificate>,
        mut serving: String,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let checked = tokio::select! {
                () = shutdown.cancelled() => return,
                checked = self.ensure() => checked,
            };
            match checked {
                Ok(material) if material.cert != serving => match material.certified_key() {
                    Ok(key) => {
                        certificate.replace(key);
                        serving = material.cert;
                        tracing::info!("now serving the renewed certificate");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the renewed certificate could not be loaded")
                    }
                },
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "checking the TLS certificate failed; will try again")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_both_service_names_and_extras() {
        let names = subject_alt_names("hearth-system", &["bridge.example.org".into(), " ".into()]);
        for expected in [
            "secret-bridge.hearth-system.svc",
            "bitwarden-sdk-server.hearth-system.svc.cluster.local",
            "127.0.0.1",
            "bridge.example.org",
        ] {
            assert!(names.contains(&expected.to_owned()), "{names:?}");
        }
        assert!(!names.contains(&String::new()));
    }

    #[test]
    fn only_a_certificate_that_really_serves_passes_the_check() {
        let names = subject_alt_names("ns", &[]);
        let good = Material::issue(None, &names).unwrap();
        assert_eq!(good.check(&names), Ok(()));
        let other = Material::issue(None, &names).unwrap();
        let broken = |change: &dyn Fn(&mut Material)| {
            let mut material = Material::issue(None, &names).unwrap();
            change(&mut material);
            material.check(&names).unwrap_err()
        };
        assert!(broken(&|m| m.cert = "garbage".into()).contains("tls.crt"));
        assert!(broken(&|m| m.key = "garbage".into()).contains("key"));
        let why = broken(&|m| m.key.clone_from(&other.key));
        assert!(why.contains("tls.key is not the key of tls.crt"), "{why}");
        // The CA served as the leaf, or a leaf from another CA: no chain to ca.crt.
        let why = broken(&|m| {
            m.cert.clone_from(&m.ca_cert);
            m.key.clone_from(&m.ca_key);
        });
        assert!(why.contains("does not serve"), "{why}");
        assert!(broken(&|m| m.ca_cert.clone_from(&other.ca_cert)).contains("does not serve"));
        let more = subject_alt_names("ns", &["bitwarden-sdk-server.eso.svc".into()]);
        assert!(
            good.check(&more)
                .unwrap_err()
                .contains("bitwarden-sdk-server.eso.svc")
        );
    }

    #[test]
    fn a_ca_whose_key_does_not_sign_for_it_is_replaced() {
        let names = subject_alt_names("ns", &[]);
        let mut previous = Material::issue(None, &names).unwrap();
        previous.ca_key = Material::issue(None, &names).unwrap().ca_key;
        let renewed = Material::renew(Some(&previous), &names).unwrap();
        assert_ne!(renewed.ca_cert, previous.ca_cert);
        assert_eq!(renewed.check(&names), Ok(()));
    }

    #[test]
    fn a_renewal_keeps_a_ca_with_years_left() {
        let names = subject_alt_names("ns", &[]);
        let first = Material::issue(None, &names).unwrap();
        let second = Material::issue(Some(&first), &names).unwrap();
        assert_eq!(first.ca_cert, second.ca_cert);
        assert_ne!(first.cert, second.cert);
        assert!(second.not_after - OffsetDateTime::now_utc() > time::Duration::days(360));
    }
}
