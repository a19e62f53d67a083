//! Bitwarden Secrets Manager, spoken natively: the identity login and the secrets endpoints the
//! SDK server used, with every value decrypted or encrypted here.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use hearth_runtime::Sensitive;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Value, json};

use crate::Error;
use crate::crypto::{AccessToken, EncString, SymmetricKey};

/// Largest upstream body read; Bitwarden's answers are far smaller.
const MAX_UPSTREAM_BODY: usize = 16 * 1024 * 1024;

/// A logged-in machine account: what every data call needs. Kept in memory only.
pub struct Session {
    pub bearer: Sensitive<String>,
    pub organization: String,
    pub key: SymmetricKey,
    /// When to log in again: five minutes before the token expires, as the SDK does.
    pub renew_at: Instant,
}

/// A secret as the SDK server returns it to ESO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretResponse {
    pub creation_date: String,
    pub id: String,
    pub key: String,
    pub note: String,
    pub organization_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub revision_date: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretIdentifier {
    pub id: String,
    pub key: String,
    pub organization_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeleteResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub id: String,
}

/// What ESO asks to create or update.
pub struct SecretWrite<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub note: &'a str,
    pub project_ids: &'a [String],
}

/// The upstream said no, or could not be reached in time.
#[derive(Clone, Debug)]
pub enum UpstreamError {
    /// An HTTP answer other than 2xx: its status and (cut) body.
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// No answer within the deadline, or no connection.
    Unreachable(String),
    /// A 2xx answer that is not what Bitwarden sends.
    Malformed(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status { status, body, .. } => {
                let reason = StatusCode::from_u16(*status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                write!(f, "[{status} {reason}] {body}")
            }
            Self::Unreachable(why) => write!(f, "Bitwarden could not be reached: {why}"),
            Self::Malformed(why) => write!(f, "Bitwarden's answer was not understood: {why}"),
        }
    }
}

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Upstream {
    /// An HTTPS client trusting the system roots plus, for self-hosted Bitwarden, the CAs in
    /// `extra_ca` (PEM). Every call is bounded by `timeout`, well inside ESO's 10 s.
    pub fn new(extra_ca: Option<&Path>, timeout: Duration) -> Result<Self, Error> {
        let tls = hearth_runtime::tls_client::config(extra_ca, "UPSTREAM_CA_FILE")
            .map_err(|e| Error::Config(e.to_string()))?;
        let connector = hearth_runtime::tls_client::connector(tls, Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { client, timeout })
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Bytes, UpstreamError> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(held_for);
            let body = Limited::new(response.into_body(), MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                Ok(body)
            } else {
                let mut text: String = String::from_utf8_lossy(&body).chars().take(512).collect();
                text = text.replace(['\n', '\r'], " ");
                Err(UpstreamError::Status {
                    status: status.as_u16(),
                    retry_after: retry_after.or_else(|| retry_hint(&text)),
                    body: text,
                })
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                UpstreamError::Unreachable(format!("no answer within {:?}", self.timeout))
            })?
    }

    /// `POST {identity}/connect/token`, then the organisation key from the encrypted payload.
    pub async fn login(
        &self,
        identity_url: &str,
        token: &AccessToken,
    ) -> Result<Session, UpstreamError> {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("scope", "api.secrets")
            .append_pair("client_id", &token.id)
            .append_pair("client_secret", token.client_secret.expose())
            .append_pair("grant_type", "client_credentials")
            .finish();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{identity_url}/connect/token"))
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header(ACCEPT, "application/json")
            .header("Device-Type", "21")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let started = Instant::now();
        let body = self.send(request).await?;
        let answer: Value =
            serde_json::from_slice(&body).map_err(|_| malformed("login answer is not JSON"))?;
        let bearer = answer["access_token"]
            .as_str()
            .ok_or_else(|| malformed("no access_token"))?;
        // A number from outside: kept between a minute and a day before any arithmetic.
        let expires_in = answer["expires_in"]
            .as_u64()
            .unwrap_or(3600)
            .clamp(60, 86_400);
        let payload: EncString = answer["encrypted_payload"]
            .as_str()
            .ok_or_else(|| malformed("no encrypted_payload"))?
            .parse()
            .map_err(|e| malformed(&format!("encrypted_payload: {e}")))?;
        let decrypted = token
            .key
            .decrypt(&payload)
            .map_err(|e| malformed(&format!("encrypted_payload: {e}")))?;
        // The key's text is read straight into a buffer that is wiped when dropped.
        let payload: LoginPayload = serde_json::from_slice(&decrypted)
            .map_err(|_| malformed("encrypted_payload holds no encryptionKey"))?;
        let encryption_key = zeroize::Zeroizing::new(payload.encryption_key);
        let org_key = zeroize::Zeroizing::new(
            STANDARD
                .decode(encryption_key.as_bytes())
                .map_err(|_| malformed("encryptionKey is not base64"))?,
        );
        let key = SymmetricKey::from_bytes(&org_key).map_err(|e| malformed(&e.to_string()))?;
        let organization =
            jwt_organization(bearer).ok_or_else(|| malformed("the token names no organization"))?;
        // Renew five minutes early, or halfway through a token shorter than ten minutes.
        let lifetime = Duration::from_secs(expires_in - 300.min(expires_in / 2));
        Ok(Session {
            bearer: Sensitive::new(bearer.to_owned()),
            organization,
            key,
            renew_at: started.checked_add(lifetime).unwrap_or(started),
        })
    }

    async fn api(
        &self,
        session: &Session,
        method: Method,
        url: String,
        body: Option<Value>,
    ) -> Result<Value, UpstreamError> {
        let mut request = Request::builder()
            .method(method)
            .uri(url)
            .header(ACCEPT, "application/json");
        let bearer = format!("Bearer {}", session.bearer.expose());
        let mut bearer = HeaderValue::from_str(&bearer)
            .map_err(|_| malformed("the access token is not a header value"))?;
        bearer.set_sensitive(true);
        request = request.header(AUTHORIZATION, bearer);
        let body = match body {
            Some(json) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let body = self.send(request).await?;
        serde_json::from_slice(&body).map_err(|_| malformed("the answer is not JSON"))
    }

    pub async fn list(
        &self,
        api_url: &str,
        session: &Session,
        organization: &str,
    ) -> Result<Vec<SecretIdentifier>, UpstreamError> {
        let url = format!(
            "{api_url}/organizations/{}/secrets",
            path_segment(organization)
        );
        let answer = self.api(session, Method::GET, url, None).await?;
        let items = answer["secrets"]
            .as_array()
            .ok_or_else(|| malformed("no secrets list"))?;
        items
            .iter()
            .map(|item| {
                Ok(SecretIdentifier {
                    id: text(item, "id")?,
                    key: decrypt_field(&session.key, item, "key")?,
                    organization_id: text(item, "organizationId")?,
                })
            })
            .collect()
    }

    /// Every secret of the organisation with its value, in one call (`secrets/sync`).
    pub async fn sync(
        &self,
        api_url: &str,
        session: &Session,
        organization: &str,
    ) -> Result<Vec<SecretResponse>, UpstreamError> {
        let url = format!(
            "{api_url}/organizations/{}/secrets/sync",
            path_segment(organization)
        );
        let answer = self.api(session, Method::GET, url, None).await?;
        let items = answer["secrets"]["data"]
            .as_array()
            .ok_or_else(|| malformed("no secrets in sync"))?;
        items
            .iter()
            .map(|item| secret(&session.key, item))
            .collect()
    }

    pub async fn get(
        &self,
        api_url: &str,
        session: &Session,
        id: &str,
    ) -> Result<SecretResponse, UpstreamError> {
        let url = format!("{api_url}/secrets/{}", path_segment(id));
        let answer = self.api(session, Method::GET, url, None).await?;
        secret(&session.key, &answer)
    }

    pub async fn get_by_ids(
        &self,
        api_url: &str,
        session: &Session,
        ids: &[String],
    ) -> Result<Vec<SecretResponse>, UpstreamError> {
        let url = format!("{api_url}/secrets/get-by-ids");
        let answer = self
            .api(session, Method::POST, url, Some(json!({"ids": ids})))
            .await?;
        let items = answer["data"]
            .as_array()
            .ok_or_else(|| malformed("no data"))?;
        items
            .iter()
            .map(|item| secret(&session.key, item))
            .collect()
    }

    pub async fn create(
        &self,
        api_url: &str,
        session: &Session,
        organization: &str,
        write: &SecretWrite<'_>,
    ) -> Result<SecretResponse, UpstreamError> {
        let url = format!(
            "{api_url}/organizations/{}/secrets",
            path_segment(organization)
        );
        let body = encrypted_write(&session.key, write, false)?;
        let answer = self.api(session, Method::POST, url, Some(body)).await?;
        secret(&session.key, &answer)
    }

    pub async fn update(
        &self,
        api_url: &str,
        session: &Session,
        id: &str,
        write: &SecretWrite<'_>,
    ) -> Result<SecretResponse, UpstreamError> {
        let url = format!("{api_url}/secrets/{}", path_segment(id));
        let body = encrypted_write(&session.key, write, true)?;
        let answer = self.api(session, Method::PUT, url, Some(body)).await?;
        secret(&session.key, &answer)
    }

    pub async fn delete(
        &self,
        api_url: &str,
        session: &Session,
        ids: &[String],
    ) -> Result<Vec<DeleteResult>, UpstreamError> {
        let url = format!("{api_url}/secrets/delete");
        let answer = self
            .api(session, Method::POST, url, Some(json!(ids)))
            .await?;
        let items = answer["data"]
            .as_array()
            .ok_or_else(|| malformed("no data"))?;
        items
            .iter()
            .map(|item| {
                Ok(DeleteResult {
                    id: text(item, "id")?,
                    error: item["error"].as_str().map(str::to_owned),
                })
            })
            .collect()
    }
}

fn malformed(why: &str) -> UpstreamError {
    UpstreamError::Malformed(why.to_owned())
}

/// Ids go into URL paths: only UUID-like text is let through unescaped.
fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

fn text(item: &Value, field: &str) -> Result<String, UpstreamError> {
    item[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| malformed(&format!("no {field}")))
}

fn decrypt_field(key: &SymmetricKey, item: &Value, field: &str) -> Result<String, UpstreamError> {
    let encrypted: EncString = text(item, field)?
        .parse()
        .map_err(|e| malformed(&format!("{field}: {e}")))?;
    let plain = key
        .decrypt(&encrypted)
        .map_err(|e| malformed(&format!("{field}: {e}")))?;
    String::from_utf8(plain.to_vec()).map_err(|_| malformed(&format!("{field} is not UTF-8")))
}

fn secret(key: &SymmetricKey, item: &Value) -> Result<SecretResponse, UpstreamError> {
    Ok(SecretResponse {
        creation_date: text(item, "creationDate")?,
        id: text(item, "id")?,
        key: decrypt_field(key, item, "key")?,
        note: decrypt_field(key, item, "note")?,
        organization_id: text(item, "organizationId")?,
        project_id: item["projects"][0]["id"].as_str().map(str::to_owned),
        revision_date: text(item, "revisionDate")?,
        value: decrypt_field(key, item, "value")?,
    })
}

fn encrypted_write(
    key: &SymmetricKey,
    write: &SecretWrite<'_>,
    update: bool,
) -> Result<Value, UpstreamError> {
    let encrypt = |plain: &str| {
        key.encrypt(plain.as_bytes())
            .map(|e| e.to_string())
            .map_err(|e| malformed(&e.to_string()))
    };
    let mut body = json!({
        "key": encrypt(write.key)?,
        "value": encrypt(write.value)?,
        "note": encrypt(write.note)?,
        "projectIds": write.project_ids,
    });
    if update {
        body["valueChanged"] = json!(true);
    }
    Ok(body)
}

/// The organisation a Secrets Manager JWT names (its signature is Bitwarden's to check).
fn jwt_organization(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["organization"].as_str().map(str::to_owned)
}

/// Bitwarden's 429 body says "Try again in Ns."; a Retry-After header wins when present.
fn retry_hint(body: &str) -> Option<Duration> {
    let after = body.split("Try again in ").nth(1)?;
    let seconds: String = after.chars().take_while(char::is_ascii_digit).collect();
    seconds.parse().ok().map(held_for)
}

/// A hold Bitwarden asks for, in seconds, kept within the longest hold the bridge honours.
fn held_for(seconds: u64) -> Duration {
    Duration::from_secs(seconds.min(crate::bridge::MAX_HOLD.as_secs()))
}

/// The decrypted login payload: only the organisation key is read.
#[derive(serde::Deserialize)]
struct LoginPayload {
    #[serde(rename = "encryptionKey")]
    encryption_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_hint_is_read_from_bitwardens_wording() {
        assert_eq!(
            retry_hint("Slow down! Too many requests. Try again in 3s."),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_hint("nope"), None);
    }

    #[test]
    fn the_organization_comes_from_the_jwt_payload() {
        let claims = URL_SAFE_NO_PAD.encode(
            br#"{"organization":"f4e44a7f-1190-432a-9d4a-af96013127cb","scope":["api.secrets"]}"#,
        );
        let jwt = format!("header.{claims}.signature");
        assert_eq!(
            jwt_organization(&jwt).as_deref(),
            Some("f4e44a7f-1190-432a-9d4a-af96013127cb")
        );
        assert_eq!(jwt_organization("not-a-jwt"), None);
    }

    #[test]
    fn upstream_errors_read_like_the_sdks() {
        let error = UpstreamError::Status {
            status: 404,
            body: "{\"message\":\"Resource not found.\"}".into(),
            retry_after: None,
        };
        assert_eq!(
            error.to_string(),
            "[404 Not Found] {\"message\":\"Resource not found.\"}"
        );
    }
}
