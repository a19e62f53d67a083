//! Sessions and the data cache: one login per access token shared by every request
//! (single-flight), renewed before expiry, re-done once on a 401, held back on a 429; and a
//! short-lived cache of what each token read, never served to another token.
//!
//! What a stranger can make it hold is bounded: a session is kept only after a successful
//! login, failed logins are remembered briefly in a bounded table (so a bogus token costs one
//! call to Bitwarden, not one per request), logins of tokens without a session are rate
//! limited, the number of sessions is capped, and idle sessions and expired data are swept by a
//! background task, not on the request path.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::crypto::AccessToken;
use crate::metrics::Metrics;
use crate::upstream::{
    DeleteResult, SecretIdentifier, SecretResponse, SecretWrite, Session, Upstream, UpstreamError,
};

/// Sessions unused this long are forgotten (and their keys wiped).
const IDLE_SESSION: Duration = Duration::from_secs(3600);
/// The most sessions held; past it the least recently used goes.
const MAX_SESSIONS: usize = 256;
/// A failed login is answered from memory for this long.
const FAILED_LOGIN_MEMORY: Duration = Duration::from_secs(30);
/// The most failed logins remembered; past it the oldest goes.
const MAX_FAILURES: usize = 1024;
/// Logins of tokens without a session: this many at once, refilled at this rate.
const LOGIN_BURST: f64 = 20.0;
const LOGINS_PER_SECOND: f64 = 5.0;
/// The longest Bitwarden may hold a token back, whatever its Retry-After says.
pub const MAX_HOLD: Duration = Duration::from_secs(3600);
/// How long a read waits for a list's prefetch of values already under way.
const PREFETCH_WAIT: Duration = Duration::from_secs(2);

type Key = [u8; 32];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `now + wait`, never past the longest hold, never overflowing.
fn hold(now: Instant, wait: Duration) -> Instant {
    let wait = wait.min(MAX_HOLD);
    now.checked_add(wait).unwrap_or(now)
}

/// Who is asking, and where their Bitwarden is.
pub struct Caller {
    pub token: AccessToken,
    pub identity_url: String,
    pub api_url: String,
    /// SHA-256 of the URLs and the whole token: sessions and cached data are keyed by it, so
    /// nothing is ever shared between two tokens, nor with a wrong or revoked one.
    key: Key,
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
#[derive(Clone, Debug)]
pub enum BridgeError {
    /// The login itself failed.
    Login(UpstreamError),
    /// Bitwarden asked us to slow down for this token; nothing is sent until then.
    RateLimited(Duration),
    /// Too many logins of unknown tokens at once; nothing was sent.
    TooManyLogins,
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
            Self::TooManyLogins => f.write_str(
                "too many logins of access tokens without a session right now; try again shortly",
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

/// A secret value held for `CACHE_TTL`, wiped when it goes.
#[derive(Clone)]
struct CachedSecret(SecretResponse);

impl Drop for CachedSecret {
    fn drop(&mut self) {
        self.0.value.zeroize();
        self.0.note.zeroize();
        self.0.key.zeroize();
    }
}

#[derive(Default)]
struct DataCache {
    /// Bumped by every write passed through: a read that began before it stores nothing.
    generation: u64,
    lists: HashMap<String, (Instant, Vec<SecretIdentifier>)>,
    secrets: HashMap<String, (Instant, CachedSecret)>,
}

/// Everything held for one token with a session.
struct Slot {
    /// Held across a renewal, so concurrent requests wait for one login.
    state: tokio::sync::Mutex<SessionState>,
    cache: Mutex<DataCache>,
    last_used: Mutex<Instant>,
    /// Held while a list's values are prefetched, so reads can wait for them.
    prefetch: Arc<tokio::sync::Mutex<()>>,
}

impl Slot {
    fn new(session: Arc<Session>) -> Self {
        Self {
            state: tokio::sync::Mutex::new(SessionState {
                session: Some(session),
                blocked_until: None,
            }),
            cache: Mutex::default(),
            last_used: Mutex::new(Instant::now()),
            prefetch: Arc::default(),
        }
    }
}

/// Recently failed logins, oldest first.
#[derive(Default)]
struct Failures {
    by_key: HashMap<Key, (Instant, BridgeError)>,
    order: VecDeque<Key>,
}

impl Failures {
    fn get(&self, key: &Key, now: Instant) -> Option<BridgeError> {
        self.by_key
            .get(key)
            .filter(|(until, _)| now < *until)
            .map(|(_, error)| error.clone())
    }

    fn insert(&mut self, key: Key, until: Instant, error: BridgeError) {
        if self.by_key.insert(key, (until, error)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > MAX_FAILURES {
            if let Some(oldest) = self.order.pop_front() {
                self.by_key.remove(&oldest);
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.by_key.retain(|_, (until, _)| now < *until);
        let by_key = &self.by_key;
        self.order.retain(|key| by_key.contains_key(key));
    }
}

/// A token bucket for logins of tokens without a session.
struct LoginBudget {
    tokens: f64,
    at: Instant,
}

impl LoginBudget {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * LOGINS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(LOGIN_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Bridge {
    upstream: Upstream,
    sessions: Mutex<HashMap<Key, Arc<Slot>>>,
    /// One lock per token being logged in for the first time (single-flight).
    logins: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    failures: Mutex<Failures>,
    budget: Mutex<LoginBudget>,
    cache_ttl: Duration,
    metrics: Metrics,
}

impl Bridge {
    pub fn new(upstream: Upstream, cache_ttl: Duration, metrics: Metrics) -> Self {
        Self {
            upstream,
            sessions: Mutex::default(),
            logins: Mutex::default(),
            failures: Mutex::default(),
            budget: Mutex::new(LoginBudget {
                tokens: LOGIN_BURST,
                at: Instant::now(),
            }),
            cache_ttl,
            metrics,
        }
    }

    /// Makes sure the caller has a session (logging in if needed), as the SDK server did before
    /// reading a request's body.
    pub async fn login(&self, caller: &Caller) -> Result<(), BridgeError> {
        self.session(caller).await.map(|_| ())
    }

    fn slot(&self, key: &Key) -> Option<Arc<Slot>> {
        let slot = lock(&self.sessions).get(key).cloned()?;
        *lock(&slot.last_used) = Instant::now();
        Some(slot)
    }

    /// The caller's slot and a current session: the one held, a renewed one, or a first login.
    async fn session(&self, caller: &Caller) -> Result<(Arc<Slot>, Arc<Session>), BridgeError> {
        match self.slot(&caller.key) {
            Some(slot) => {
                let session = self.renew(&slot, caller).await?;
                Ok((slot, session))
            }
            None => self.first_login(caller).await,
        }
    }

    /// The slot's session, logging in again when it is due for renewal or was dropped after a
    /// 401. Nothing is sent while Bitwarden holds the token back.
    async fn renew(&self, slot: &Slot, caller: &Caller) -> Result<Arc<Session>, BridgeError> {
        let mut state = slot.state.lock().await;
        let now = Instant::now();
        if let Some(until) = state.blocked_until.filter(|until| now < *until) {
            return Err(BridgeError::RateLimited(until - now));
        }
        if let Some(session) = state.session.as_ref().filter(|s| now < s.renew_at) {
            return Ok(Arc::clone(session));
        }
        state.session = None;
        match self.log_in(caller).await {
            Ok(session) => {
                state.session = Some(Arc::clone(&session));
                state.blocked_until = None;
                Ok(session)
            }
            Err(BridgeError::RateLimited(wait)) => {
                state.blocked_until = Some(hold(now, wait));
                Err(BridgeError::RateLimited(wait))
            }
            Err(error) => {
                // The token no longer logs in (revoked): forget it like any unknown token.
                if matches!(&error, BridgeError::Login(UpstreamError::Status { .. })) {
                    lock(&self.sessions).remove(&caller.key);
                    self.count_sessions();
                }
                Err(error)
            }
        }
    }

    /// A token without a session: answered from memory when it failed just now, rate limited,
    /// and logged in once however many requests ask at the same moment.
    async fn first_login(&self, caller: &Caller) -> Result<(Arc<Slot>, Arc<Session>), BridgeError> {
        if let Some(error) = lock(&self.failures).get(&caller.key, Instant::now()) {
            return Err(error);
        }
        let turn = Arc::clone(lock(&self.logins).entry(caller.key).or_default());
        let _turn = turn.lock().await;
        let outcome = async {
            // Someone else may have logged in, or failed, while this request waited.
            if let Some(slot) = self.slot(&caller.key) {
                let session = self.renew(&slot, caller).await?;
                return Ok((slot, session));
            }
            if let Some(error) = lock(&self.failures).get(&caller.key, Instant::now()) {
                return Err(error);
            }
            if !lock(&self.budget).take(Instant::now()) {
                return Err(BridgeError::TooManyLogins);
            }
            match self.log_in(caller).await {
                Ok(session) => {
                    let slot = Arc::new(Slot::new(Arc::clone(&session)));
                    self.keep(caller.key, Arc::clone(&slot));
                    Ok((slot, session))
                }
                Err(error) => {
                    let now = Instant::now();
                    let until = match &error {
                        BridgeError::RateLimited(wait) => Some(hold(now, *wait)),
                        // A refusal (a wrong or revoked token) is remembered; a network
                        // failure is not, so the next request tries again.
                        BridgeError::Login(UpstreamError::Status { .. }) => {
                            Some(hold(now, FAILED_LOGIN_MEMORY))
                        }
                        _ => None,
                    };
                    if let Some(until) = until {
                        lock(&self.failures).insert(caller.key, until, error.clone());
                    }
                    Err(error)
                }
            }
        }
        .await;
        lock(&self.logins).remove(&caller.key);
        outcome
    }

    /// Keeps a new session, making room by dropping the least recently used one.
    fn keep(&self, key: Key, slot: Arc<Slot>) {
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, slot)| *lock(&slot.last_used))
                .map(|(key, _)| *key)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(key, slot);
        drop(sessions);
        self.count_sessions();
    }

    fn count_sessions(&self) {
        let count = lock(&self.sessions).len();
        self.metrics
            .sessions
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    async fn log_in(&self, caller: &Caller) -> Result<Arc<Session>, BridgeError> {
        self.metrics.logins.inc();
        let login = self.upstream.login(&caller.identity_url, &caller.token);
        match self.observe("login", login).await {
            Ok(session) => Ok(Arc::new(session)),
            Err(error) => Err(self
                .rate_limited(&error)
                .map_or(BridgeError::Login(error), BridgeError::RateLimited)),
        }
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
                        .clamp(Duration::from_secs(1), MAX_HOLD),
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
        observe(&self.metrics, kind, call).await
    }

    /// Runs one data call with a session; an upstream 401 means the session went stale, so it
    /// logs in again once and retries; a 429 holds the token back.
    async fn call<T, F, Fut>(
        &self,
        caller: &Caller,
        kind: &'static str,
        call: F,
    ) -> Result<(Arc<Slot>, T), BridgeError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let (slot, session) = self.session(caller).await?;
        let result = match self.observe(kind, call(Arc::clone(&session))).await {
            Err(UpstreamError::Status { status: 401, .. }) => {
                {
                    let mut state = slot.state.lock().await;
                    if state
                        .session
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &session))
                    {
                        state.session = None;
                    }
                }
                let fresh = self.renew(&slot, caller).await?;
                self.observe(kind, call(fresh)).await
            }
            other => other,
        };
        match result {
            Ok(value) => Ok((slot, value)),
            Err(error) => {
                if let Some(wait) = self.rate_limited(&error) {
                    slot.state.lock().await.blocked_until = Some(hold(Instant::now(), wait));
                    return Err(BridgeError::RateLimited(wait));
                }
                Err(BridgeError::Upstream(error))
            }
        }
    }

    fn fresh(&self, at: Instant) -> bool {
        !self.cache_ttl.is_zero() && at.elapsed() < self.cache_ttl
    }

    fn count_lookup(&self, hit: bool) {
        let outcome = if hit { "hit" } else { "miss" };
        self.metrics.cache.with_label_values(&[outcome]).inc();
    }

    /// A cached value, and the cache generation a read starting now must find unchanged to
    /// store what it reads.
    fn lookup(&self, caller: &Caller, id: &str) -> (Option<SecretResponse>, u64) {
        let Some(slot) = self.slot(&caller.key) else {
            return (None, 0);
        };
        let cache = lock(&slot.cache);
        let hit = cache
            .secrets
            .get(id)
            .filter(|(at, _)| self.fresh(*at))
            .map(|(_, cached)| cached.0.clone());
        (hit, cache.generation)
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<SecretResponse, BridgeError> {
        let (mut hit, mut generation) = self.lookup(caller, id);
        if hit.is_none()
            && !self.cache_ttl.is_zero()
            && let Some(slot) = self.slot(&caller.key)
        {
            // A list's prefetch under way brings this value too: wait for it, briefly.
            let _ = tokio::time::timeout(PREFETCH_WAIT, slot.prefetch.lock()).await;
            (hit, generation) = self.lookup(caller, id);
        }
        self.count_lookup(hit.is_some());
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let api = &caller.api_url;
        let (slot, secret) = self
            .call(caller, "get", |s| async move {
                self.upstream.get(api, &s, id).await
            })
            .await?;
        self.remember(&slot, generation, std::slice::from_ref(&secret));
        Ok(secret)
    }

    /// Lists an organisation's secrets. With the cache on, the same moment's values are
    /// fetched beside it in one more call (`secrets/sync`), so ESO's get-per-listed-secret that
    /// follows is served from memory. The list never waits for that call: a slow Bitwarden
    /// cannot turn a list that would succeed into a failure.
    pub async fn list(
        &self,
        caller: &Caller,
        organization: &str,
    ) -> Result<Vec<SecretIdentifier>, BridgeError> {
        let cached = self.slot(&caller.key).map(|slot| {
            let cache = lock(&slot.cache);
            let hit = cache
                .lists
                .get(organization)
                .filter(|(at, _)| self.fresh(*at))
                .map(|(_, list)| list.clone());
            (hit, cache.generation)
        });
        let (hit, generation) = cached.unwrap_or((None, 0));
        self.count_lookup(hit.is_some());
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let (slot, session) = self.session(caller).await?;
        if !self.cache_ttl.is_zero() {
            self.prefetch(&slot, &session, caller, organization, generation);
        }
        let api = &caller.api_url;
        let (slot, list) = self
            .call(caller, "list", |s| async move {
                self.upstream.list(api, &s, organization).await
            })
            .await?;
        if !self.cache_ttl.is_zero() {
            let mut cache = lock(&slot.cache);
            if cache.generation == generation {
                cache
                    .lists
                    .insert(organization.to_owned(), (Instant::now(), list.clone()));
            }
        }
        Ok(list)
    }

    /// Fetches every value of the organisation in the background (one at a time per token),
    /// keeping them only if no write passed through meanwhile.
    fn prefetch(
        &self,
        slot: &Arc<Slot>,
        session: &Arc<Session>,
        caller: &Caller,
        organization: &str,
        generation: u64,
    ) {
        let Ok(running) = Arc::clone(&slot.prefetch).try_lock_owned() else {
            return;
        };
        let upstream = self.upstream.clone();
        let metrics = self.metrics.clone();
        let slot = Arc::clone(slot);
        let session = Arc::clone(session);
        let api = caller.api_url.clone();
        let organization = organization.to_owned();
        tokio::spawn(async move {
            let sync = upstream.sync(&api, &session, &organization);
            match observe(&metrics, "sync", sync).await {
                Ok(secrets) => store(&slot, generation, &secrets),
                // The values are fetched one by one instead.
                Err(error) => tracing::warn!(%error, "prefetching values failed"),
            }
            drop(running);
        });
    }

    pub async fn get_by_ids(
        &self,
        caller: &Caller,
        ids: &[String],
    ) -> Result<Vec<SecretResponse>, BridgeError> {
        let generation = self.generation(caller);
        let api = &caller.api_url;
        let (slot, secrets) = self
            .call(caller, "get_by_ids", |s| async move {
                self.upstream.get_by_ids(api, &s, ids).await
            })
            .await?;
        self.remember(&slot, generation, &secrets);
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
        created.map(|(_, secret)| secret)
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
        updated.map(|(_, secret)| secret)
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
        deleted.map(|(_, results)| results)
    }

    fn generation(&self, caller: &Caller) -> u64 {
        self.slot(&caller.key)
            .map_or(0, |slot| lock(&slot.cache).generation)
    }

    fn remember(&self, slot: &Slot, generation: u64, secrets: &[SecretResponse]) {
        if !self.cache_ttl.is_zero() {
            store(slot, generation, secrets);
        }
    }

    /// A write passed through: whatever this token had cached may be stale now, and so is
    /// whatever a read under way will bring.
    fn forget(&self, caller: &Caller) {
        if let Some(slot) = self.slot(&caller.key) {
            let mut cache = lock(&slot.cache);
            let generation = cache.generation.wrapping_add(1);
            *cache = DataCache {
                generation,
                ..DataCache::default()
            };
        }
    }

    /// Drops idle sessions, expired data and old failures; run off the request path.
    pub fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.cache_ttl;
        let mut cached = 0;
        lock(&self.sessions).retain(|_, slot| {
            let mut cache = lock(&slot.cache);
            cache
                .secrets
                .retain(|_, (at, _)| now.duration_since(*at) < ttl);
            cache
                .lists
                .retain(|_, (at, _)| now.duration_since(*at) < ttl);
            cached += cache.secrets.len();
            now.duration_since(*lock(&slot.last_used)) < IDLE_SESSION
        });
        lock(&self.failures).sweep(now);
        self.count_sessions();
        self.metrics
            .cached_secrets
            .set(i64::try_from(cached).unwrap_or(i64::MAX));
    }
}

fn store(slot: &Slot, generation: u64, secrets: &[SecretResponse]) {
    let now = Instant::now();
    let mut cache = lock(&slot.cache);
    if cache.generation != generation {
        return;
    }
    for secret in secrets {
        cache
            .secrets
            .insert(secret.id.clone(), (now, CachedSecret(secret.clone())));
    }
}

async fn observe<T>(
    metrics: &Metrics,
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
    metrics
        .upstream_calls
        .with_label_values(&[kind, &status])
        .inc();
    metrics
        .upstream_latency
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    result
}
