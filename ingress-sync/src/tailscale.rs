//! The Tailscale API, for the one thing ingress-sync asks of it: the tailnet's devices, to find
//! operator proxies left behind that hold an app's host name (the cause of `-1` suffixes), and
//! to delete them when told to.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth_runtime::Sensitive;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::Error;

/// Every call is bounded; the API is asked rarely, so this can be generous.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest answer read (a tailnet's device list is far smaller).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// The longest the API may hold us back, whatever its Retry-After says.
const MAX_HOLD: Duration = Duration::from_secs(3600);

/// How ingress-sync authenticates to the Tailscale API.
pub enum Credentials {
    /// An API access token (`tskey-api-…`).
    ApiKey(Sensitive<String>),
    /// An OAuth client (`tskey-client-…`), exchanged for hour-long access tokens.
    OAuth {
        id: String,
        secret: Sensitive<String>,
    },
}

/// A device as the API lists it; only what the orphan check reads.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default)]
    pub node_id: String,
    /// The MagicDNS name, e.g. `paperless.tail1234.ts.net`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub connected_to_control: bool,
    /// RFC 3339; absent while the device is connected.
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub is_external: bool,
}

#[derive(Deserialize)]
struct DeviceList {
    devices: Vec<Device>,
}

#[derive(Deserialize)]
struct OAuthToken {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

pub struct TailscaleApi {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    tailnet: String,
    credentials: Credentials,
    /// An OAuth access token and when to get a new one.
    token: Mutex<Option<(Sensitive<String>, Instant)>>,
}

/// What went wrong with a call, and for how long to leave the API alone.
#[derive(Debug)]
pub struct ApiFailure {
    pub message: String,
    /// The HTTP status, when the API answered.
    pub status: Option<u16>,
    /// Set for 429 and 5xx: the API asked for (or needs) a pause.
    pub back_off: Option<Duration>,
}

impl ApiFailure {
    fn local(message: String) -> Self {
        Self {
            message,
            status: None,
            back_off: None,
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl TailscaleApi {
    pub fn new(base: &str, tailnet: &str, credentials: Credentials) -> Result<Self, Error> {
        let tls = hearth_runtime::tls_client::config(None, "")
            .map_err(|e| Error::Config(e.to_string()))?;
        let connector = hearth_runtime::tls_client::connector(tls, Some(CALL_TIMEOUT));
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: base.trim_end_matches('/').to_owned(),
            tailnet: tailnet.to_owned(),
            credentials,
            token: Mutex::default(),
        })
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Bytes, ApiFailure> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                ApiFailure::local(format!("the Tailscale API could not be reached: {e}"))
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|seconds| Duration::from_secs(seconds).min(MAX_HOLD));
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ApiFailure::local(format!("reading the Tailscale API's answer: {e}")))?
                .to_bytes();
            if status.is_success() {
                return Ok(body);
            }
            let text: String = String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
                .replace(['\n', '\r'], " ");
            let back_off = (status.as_u16() == 429 || status.is_server_error())
                .then(|| retry_after.unwrap_or(Duration::from_secs(60)));
            Err(ApiFailure {
                message: format!("the Tailscale API answered {status}: {text}"),
                status: Some(status.as_u16()),
                back_off,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                ApiFailure::local(format!(
                    "the Tailscale API did not answer within {CALL_TIMEOUT:?}"
                ))
            })?
    }

    /// The bearer token for a call: the API key, or a current OAuth access token.
    async fn bearer(&self) -> Result<Sensitive<String>, ApiFailure> {
        let (id, secret) = match &self.credentials {
            Credentials::ApiKey(key) => return Ok(key.clone()),
            Credentials::OAuth { id, secret } => (id, secret),
        };
        let now = Instant::now();
        let held = self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(token, _)| token.clone());
        if let Some(token) = held {
            return Ok(token);
        }
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", id)
            .append_pair("client_secret", secret.expose())
            .append_pair("grant_type", "client_credentials")
            .finish();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/api/v2/oauth/token", self.base))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| ApiFailure::local(e.to_string()))?;
        let body = self.send(request).await?;
        let answer: OAuthToken = serde_json::from_slice(&body).map_err(|_| {
            ApiFailure::local("the OAuth token answer is not what Tailscale sends".to_owned())
        })?;
        // Renewed a minute early; the lifetime is a number from outside, so it is clamped.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600).clamp(120, 86_400));
        let token = Sensitive::new(answer.access_token);
        let until = now
            .checked_add(lifetime - Duration::from_secs(60))
            .unwrap_or(now);
        *self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((token.clone(), until));
        Ok(token)
    }

    async fn call(&self, method: Method, path: &str) -> Result<Bytes, ApiFailure> {
        let bearer = self.bearer().await?;
        let mut authorization =
            hyper::header::HeaderValue::from_str(&format!("Bearer {}", bearer.expose())).map_err(
                |_| ApiFailure::local("the Tailscale credential is not a header value".to_owned()),
            )?;
        authorization.set_sensitive(true);
        let request = Request::builder()
            .method(method)
            .uri(format!("{}/api/v2{path}", self.base))
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| ApiFailure::local(e.to_string()))?;
        self.send(request).await
    }

    pub async fn devices(&self) -> Result<Vec<Device>, ApiFailure> {
        let tailnet =
            url::form_urlencoded::byte_serialize(self.tailnet.as_bytes()).collect::<String>();
        let body = self
            .call(
                Method::GET,
                &format!("/tailnet/{tailnet}/devices?fields=all"),
            )
            .await?;
        serde_json::from_slice::<DeviceList>(&body)
            .map(|list| list.devices)
            .map_err(|_| {
                ApiFailure::local("the device list is not what Tailscale sends".to_owned())
            })
    }

    /// Deletes a device; one already gone counts as deleted.
    pub async fn delete(&self, node_id: &str) -> Result<(), ApiFailure> {
        let id = url::form_urlencoded::byte_serialize(node_id.as_bytes()).collect::<String>();
        match self.call(Method::DELETE, &format!("/device/{id}")).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.status == Some(404) => Ok(()),
            Err(failure) => Err(failure),
        }
    }
}
