//! Sessions and the data cache: one login per access token shared by every request
//! (single-flight), renewed before expiry, re-done once on a 401, backed off on a 429; and a
//! short-lived cache of what each token read, never served to another token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::crypto::AccessToken;
use crate::metrics::Metrics;
use crate::upstream::{
    DeleteResult, SecretIdentifier, SecretResponse, SecretWrite, Session, Upstream, UpstreamError,
};

/// Who is asking, and where their Bitwarden is.
pub struct Caller {
    pub token: AccessToken,
    pub identity_url: String,
    pub api_url: String,
    /// SHA-256 of the URLs and the whole token: sessions and cached data are keyed by it, so
    /// nothing is ever shared between two tokens, nor with a wrong or revoked one.
    key: [u8; 32],
}

impl Caller {
    pub fn new(
        token_text: &str,
        token: AccessToken,
        identity_url: String,
        api_url: String,
    ) -> Self {
        let mut hash = Sha256::new();
        for part in [identity_url.as_str(), api_url.as_str(), token_text] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        Self {
            token,
            identity_url,
            api_url,
            key: hash.finalize().into(),
        }
    }
}

/// Why a request could not be served.
#[derive(Debug)]
pub enum BridgeError {
    /// The login itself failed.
    Login(UpstreamError),
    /// Bitwarden asked us to slow down for this token; nothing is sent until then.
    RateLimited(Duration),
    /// A data call failed.
    Upstream(UpstreamError),
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Login(error) => write!(f, "bitwarden login: {error}"),
            Self::RateLimited(wait) => write!(
                f,
                "Bitwarden rate limit: waiting {}s before trying again",
                wait.as_secs().max(1)
            ),
            Self::Upstream(error) => write!(f, "{error}"),
        }
    }
}

#[derive(Default)]
struct SessionState {
    session: Option<Arc<Session>>,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
struct DataCache {
    lists: HashMap<String, (Instant, Vec<SecretIdentifier>)>,
    secrets: HashMap<String, (Instant, SecretResponse)>,
}

/// Everything held for one token.
#[derive(Default)]
struct Slot {
    /// Held across a login, so concurrent requests wait for one login instead of each doing one.
    session: tokio::sync::Mutex<SessionState>,
    cache: Mutex<DataCache>,
    last_used: Mutex<Option<Instant>>,
}

/// Sessions unused this long are forgotten (and their keys wiped).
const IDLE_SESSION: Duration = Duration::from_secs(3600);

pub struct Bridge {
    upstream: Upstream,
    slots: Mutex<HashMap<[u8; 32], Arc<Slot>>>,
    cache_ttl: Duration,
    metrics: Metrics,
}

impl Bridge {
    pub fn new(upstream: Upstream, cache_ttl: Duration, metrics: Metrics) -> Self {
        Self {
            upstream,
            slots: Mutex::default(),
            cache_ttl,
            metrics,
        }
    }

    fn slot(&self, caller: &Caller) -> Arc<Slot> {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, slot| {
            let last = *slot
                .last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            last.is_none_or(|at| now.duration_since(at) < IDLE_SESSION)
        });
        let slot = Arc::clone(slots.entry(caller.key).or_default());
        *slot
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now);
        self.metrics
            .sessions
            .set(i64::try_from(slots.len()).unwrap_or(i64::MAX));
        slot
    }

    async fn session(&self, slot: &Slot, caller: &Caller) -> Result<Arc<Session>, BridgeError> {
        let mut state = slot.session.lock().await;
        let now = Instant::now();
        if let Some(session) = state.session.as_ref().filter(|s| now < s.renew_at) {
            return Ok(Arc::clone(session));
        }
        if let Some(until) = state.blocked_until.filter(|until| now < *until) {
            return Err(BridgeError::RateLimited(until - now));
        }
        self.metrics.logins.inc();
        let login = self.upstream.login(&caller.identity_url, &caller.token);
        match self.observe("login", login).await {
            Ok(session) => {
                let session = Arc::new(session);
                state.session = Some(Arc::clone(&session));
                state.blocked_until = None;
                Ok(session)
            }
            Err(error) => {
                state.session = None;
                if let Some(wait) = self.rate_limited(&error) {
                    state.blocked_until = Some(now + wait);
                    return Err(BridgeError::RateLimited(wait));
                }
                Err(BridgeError::Login(error))
            }
        }
    }

    /// Makes sure the caller has a session (logging in if needed), as the SDK server did before
    /// reading a request's body.
    pub async fn login(&self, caller: &Caller) -> Result<(), BridgeError> {
        let slot = self.slot(caller);
        self.session(&slot, caller).await.map(|_| ())
    }

    fn rate_limited(&self, error: &UpstreamError) -> Option<Duration> {
        match error {
            UpstreamError::Status {
                status: 429,
                retry_after,
                ..
            } => {
                self.metrics.rate_limited.inc();
                Some(
                    retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_secs(1)),
                )
            }
            _ => None,
        }
    }

    async fn observe<T>(
        &self,
        kind: &'static str,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let started = Instant::now();
        let result = call.await;
        let status = match &result {
            Ok(_) => "200".to_owned(),
            Err(UpstreamError::Status { status, .. }) => status.to_string(),
            Err(UpstreamError::Unreachable(_)) => "unreachable".to_owned(),
            Err(UpstreamError::Malformed(_)) => "malformed".to_owned(),
        };
        self.metrics
            .upstream_calls
            .with_label_values(&[kind, &status])
            .inc();
        self.metrics
            .upstream_latency
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Runs one data call with a session; an upstream 401 means the session went stale, so it
    /// logs in again once and retries; a 429 backs the token off.
    async fn call<T, F, Fut>(
        &self,
        caller: &Caller,
        kind: &'static str,
        call: F,
    ) -> Result<T, BridgeError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let slot = self.slot(caller);
        let session = self.session(&slot, caller).await?;
        let result = match self.observe(kind, call(Arc::clone(&session))).await {
            Err(UpstreamError::Status { status: 401, .. }) => {
                {
                    let mut state = slot.session.lock().await;
                    if state
                        .session
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &session))
                    {
                        state.session = None;
                    }
                }
                let fresh = self.session(&slot, caller).await?;
                self.observe(kind, call(fresh)).await
            }
            other => other,
        };
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                if let Some(wait) = self.rate_limited(&error) {
                    slot.session.lock().await.blocked_until = Some(Instant::now() + wait);
                    return Err(BridgeError::RateLimited(wait));
                }
                Err(BridgeError::Upstream(error))
            }
        }
    }

    fn cached<T: Clone>(&self, found: Option<&(Instant, T)>) -> Option<T> {
        let hit = found
            .filter(|(at, _)| !self.cache_ttl.is_zero() && at.elapsed() < self.cache_ttl)
            .map(|(_, value)| value.clone());
        let outcome = if hit.is_some() { "hit" } else { "miss" };
        self.metrics.cache.with_label_values(&[outcome]).inc();
        hit
    }

    fn with_cache<T>(&self, caller: &Caller, use_cache: impl FnOnce(&mut DataCache) -> T) -> T {
        let slot = self.slot(caller);
        let mut cache = slot.cache.lock().unwrap_or_else(PoisonError::into_inner);
        use_cache(&mut cache)
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<SecretResponse, BridgeError> {
        if let Some(hit) = self.with_cache(caller, |c| self.cached(c.secrets.get(id))) {
            return Ok(hit);
        }
        let api = &caller.api_url;
        let secret = self
            .call(caller, "get", |s| async move {
                self.upstream.get(api, &s, id).await
            })
            .await?;
        self.remember(caller, std::slice::from_ref(&secret));
        Ok(secret)
    }

    /// Lists an organisation's secrets. With the cache on, the same moment's values are
    /// fetched in one more call (`secrets/sync`), so ESO's get-per-listed-secret that follows
    /// is served from memory.
    pub async fn list(
        &self,
        caller: &Caller,
        organization: &str,
    ) -> Result<Vec<SecretIdentifier>, BridgeError> {
        if let Some(hit) = self.with_cache(caller, |c| self.cached(c.lists.get(organization))) {
            return Ok(hit);
        }
        let api = &caller.api_url;
        let list = self
            .call(caller, "list", |s| async move {
                self.upstream.list(api, &s, organization).await
            })
            .await?;
        if !self.cache_ttl.is_zero() {
            let sync = self
                .call(caller, "sync", |s| async move {
                    self.upstream.sync(api, &s, organization).await
                })
                .await;
            match sync {
                Ok(secrets) => self.remember(caller, &secrets),
                // The list still stands; the values are fetched one by one instead.
                Err(error) => tracing::warn!(%error, "prefetching values failed"),
            }
            self.with_cache(caller, |c| {
                c.lists
                    .insert(organization.to_owned(), (Instant::now(), list.clone()));
            });
        }
        Ok(list)
    }

    pub async fn get_by_ids(
        &self,
        caller: &Caller,
        ids: &[String],
    ) -> Result<Vec<SecretResponse>, BridgeError> {
        let api = &caller.api_url;
        let secrets = self
            .call(caller, "get_by_ids", |s| async move {
                self.upstream.get_by_ids(api, &s, ids).await
            })
            .await?;
        self.remember(caller, &secrets);
        Ok(secrets)
    }

    pub async fn create(
        &self,
        caller: &Caller,
        organization: &str,
        write: &SecretWrite<'_>,
    ) -> Result<SecretResponse, BridgeError> {
        let api = &caller.api_url;
        let created = self
            .call(caller, "create", |s| async move {
                self.upstream.create(api, &s, organization, write).await
            })
            .await;
        self.forget(caller);
        created
    }

    pub async fn update(
        &self,
        caller: &Caller,
        id: &str,
        write: &SecretWrite<'_>,
    ) -> Result<SecretResponse, BridgeError> {
        let api = &caller.api_url;
        let updated = self
            .call(caller, "update", |s| async move {
                self.upstream.update(api, &s, id, write).await
            })
            .await;
        self.forget(caller);
        updated
    }

    pub async fn delete(
        &self,
        caller: &Caller,
        ids: &[String],
    ) -> Result<Vec<DeleteResult>, BridgeError> {
        let api = &caller.api_url;
        let deleted = self
            .call(caller, "delete", |s| async move {
                self.upstream.delete(api, &s, ids).await
            })
            .await;
        self.forget(caller);
        deleted
    }

    fn remember(&self, caller: &Caller, secrets: &[SecretResponse]) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        self.with_cache(caller, |c| {
            for secret in secrets {
                c.secrets.insert(secret.id.clone(), (now, secret.clone()));
            }
        });
    }

    /// A write passed through: whatever this token had cached may be stale now.
    fn forget(&self, caller: &Caller) {
        self.with_cache(caller, |c| *c = DataCache::default());
    }
}
