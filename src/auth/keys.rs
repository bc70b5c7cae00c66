//! Verification keys: an HMAC secret, PEM public keys, and an issuer's JWKS.
//!
//! The JWKS is fetched at startup and every `auth.jwks_refresh_secs`; a token whose `kid`
//! is unknown triggers one extra fetch, at most once per `auth.jwks_min_refetch_secs`
//! however many such tokens arrive (concurrent misses share the fetch). A failed fetch
//! keeps the last good key set, so an issuer outage does not log everyone out. Keys are
//! only ever fetched from the configured URL: `jku`, `x5u` and embedded `jwk` headers are
//! never followed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// A public key and the algorithm its JWK restricts it to (if any).
#[derive(Clone)]
pub struct PublicKey {
    pub key: DecodingKey,
    pub alg: Option<Algorithm>,
}

impl PublicKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.key.family() == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// Loads the PEM files of `auth.public_key_files`. Each file holds one public key: RSA,
/// EC (P-256 or P-384) or Ed25519.
///
/// # Errors
/// A file that cannot be read or holds no usable public key.
pub fn load_pem_files(paths: &[std::path::PathBuf]) -> Result<Vec<PublicKey>, String> {
    paths
        .iter()
        .map(|path| {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.public_key_files: {}: {e}", path.display()))?;
            DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map(|key| PublicKey { key, alg: None })
                .map_err(|_| {
                    format!(
                        "auth.public_key_files: {}: not a PEM RSA, EC or Ed25519 public key",
                        path.display()
                    )
                })
        })
        .collect()
}

/// The current key set, by kid (keys without a kid are kept apart).
#[derive(Default)]
pub struct KeySet {
    pub by_kid: HashMap<String, PublicKey>,
    pub without_kid: Vec<PublicKey>,
}

impl KeySet {
    /// Keeps the signing keys of `set` that chatgate can use: public keys (never `oct`
    /// secrets from a URL), not marked for encryption only, with a known algorithm.
    fn from_jwks(set: &JwkSet) -> Self {
        let mut keys = Self::default();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
                || matches!(
                    jwk.algorithm,
                    AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_)
                )
            {
                continue;
            }
            let alg = match jwk.common.key_algorithm {
                None => None,
                Some(ka) => match serde_json::to_value(ka)
                    .ok()
                    .and_then(|v| v.as_str()?.parse::<Algorithm>().ok())
                {
                    Some(alg) => Some(alg),
                    // RSA-OAEP and other encryption algorithms.
                    None => continue,
                },
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let key = PublicKey { key, alg };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), key);
                }
                None => keys.without_kid.push(key),
            }
        }
        keys
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Timing of JWKS fetches, from `[auth]` config.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: String,
    pub refresh: Duration,
    pub min_refetch: Duration,
    pub timeout: Duration,
}

/// The issuer's key set, cached and refreshed.
pub struct Jwks {
    settings: JwksSettings,
    /// The URL as logs show it: scheme, host and path, never user info or a query
    /// (either could hold a credential).
    log_url: String,
    /// Fetches caused by unknown kids run here, so a client that hangs up mid-fetch
    /// cannot cancel it (and leave the rate limit armed with no new keys).
    tasks: TaskTracker,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch caused by an unknown kid started; another such fetch waits
    /// until it is `min_refetch` old. Held during that fetch, so concurrent misses share it.
    last_miss: tokio::sync::Mutex<Option<Instant>>,
    loaded: AtomicBool,
    fetches: AtomicU64,
}

impl Jwks {
    /// # Errors
    /// The HTTP client cannot be built (no TLS roots).
    pub fn new(settings: JwksSettings, tasks: TaskTracker) -> Result<Self, String> {
        crate::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // Keys come from the configured URL only, never from wherever it redirects.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("chatgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("auth.jwks_url: cannot build the HTTP client: {e}"))?;
        let log_url = reqwest::Url::parse(&settings.url).map_or_else(
            |_| "(unparsable URL)".to_string(),
            |u| {
                format!(
                    "{}://{}{}",
                    u.scheme(),
                    u.host_str().unwrap_or(""),
                    u.path()
                )
            },
        );
        Ok(Self {
            settings,
            log_url,
            tasks,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_miss: tokio::sync::Mutex::new(None),
            loaded: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
        })
    }

    /// The current key set (possibly empty before the first successful fetch).
    pub fn current(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether a key set has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Fetches started so far (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Fetches now and replaces the key set on success (the last good set stays on
    /// failure). Returns whether the fetch succeeded.
    pub async fn refresh(&self) -> bool {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(keys = set.len(), url = %self.log_url, "JWKS loaded");
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
                self.loaded.store(true, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(url = %self.log_url, error = %e, "JWKS fetch failed; keeping the last good key set");
                false
            }
        }
    }

    /// A kid that is not in the current set: fetch again (at most once per
    /// `min_refetch`, however many unknown kids arrive), then look again. The fetch runs
    /// as its own task: concurrent misses wait for it, and none can cancel it.
    pub async fn find_after_miss(self: &Arc<Self>, kid: &str) -> Option<PublicKey> {
        {
            let mut last = self.last_miss.lock().await;
            if let Some(key) = self.current().by_kid.get(kid) {
                // Another miss fetched it while this one waited.
                return Some(key.clone());
            }
            if last.is_none_or(|at| at.elapsed() >= self.settings.min_refetch) {
                *last = Some(Instant::now());
                let jwks = self.clone();
                let _ = self.tasks.spawn(async move { jwks.refresh().await }).await;
            }
        }
        self.current().by_kid.get(kid).cloned()
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let mut response = self
            .client
            .get(&self.settings.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("JWKS larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        let keys = KeySet::from_jwks(&set);
        if keys.is_empty() {
            return Err("the JWK set holds no usable signing key".into());
        }
        Ok(keys)
    }

    /// Refreshes every `auth.jwks_refresh_secs` until cancelled; after a failure, retries
    /// every `auth.jwks_min_refetch_secs` until a fetch succeeds.
    pub async fn keep_fresh(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let wait = if self.is_loaded() {
                self.settings.refresh
            } else {
                self.settings.min_refetch
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if !self.refresh().await && self.is_loaded() {
                // Keep the old keys, but try again sooner than a full refresh period.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.settings.min_refetch) => {}
                }
                self.refresh().await;
            }
        }
    }
}
