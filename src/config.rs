//! Typed configuration and its layering.
//!
//! Sources, later wins: `config/default.toml` (compiled in, so the binary runs from any
//! directory) < `<config dir>/<environment>.toml` < the `--config` file < environment
//! variables < command-line flags. Every key has a `CHATGATE_<SECTION>__<KEY>` variable;
//! the original service's `REDIS_*` and `API_*` variables work too.
//!
//! Loading never reads the process environment itself: the caller passes the variables
//! in ([`Overrides::vars`]), so tests build configurations without touching global state.
//! Every problem (unknown key, wrong type, invalid value) is collected and reported at
//! once in one [`ConfigError`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

/// The built-in defaults: every key, commented. Also the schema used to type
/// environment variables and to spot unknown keys.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that set configuration keys.
const ENV_PREFIX: &str = "CHATGATE_";

/// The whole configuration, after layering and validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub store: StoreConfig,
    pub chat: ChatConfig,
    pub ws: WsConfig,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub limits: LimitsConfig,
    pub memory: MemoryConfig,
    pub web: WebConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    pub log: LogConfig,
    /// `--dev`: auth off, CORS open, readable logs, in-memory store when no Redis is set.
    #[serde(skip)]
    pub dev: bool,
    /// The environment whose file was layered in (`development`, `production`, ...).
    #[serde(skip)]
    pub environment: String,
    /// Things worth telling the operator that do not stop startup (logged by `main`).
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// This process's id: the bus origin of its connections and `service.instance.id`
    /// of its spans. New on every start.
    #[serde(skip)]
    pub instance_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub shutdown_grace_secs: u64,
    pub request_timeout_secs: u64,
    pub max_body_bytes: usize,
    pub trusted_proxies: Vec<String>,
    pub allow_dev_mode: bool,
    /// Seconds from a request's first byte to the end of its headers.
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may send nothing: before its first request, and between
    /// requests on keep-alive (never once upgraded to a WebSocket).
    pub idle_timeout_secs: u64,
    /// Seconds from a WebSocket upgrade request's headers to the 101.
    pub handshake_timeout_secs: u64,
    /// Concurrent TCP connections on the public listener in this process.
    pub max_connections: u32,
    /// Concurrent TCP connections per peer address (applied with `limits.enabled`;
    /// trusted proxies are not capped per address).
    pub max_connections_per_ip: u32,
}

impl ServerConfig {
    /// The connection hygiene keys: timeouts from 1 s to a day, caps at least 1 and at
    /// least the WebSocket caps they contain (every WebSocket is a TCP connection first).
    fn validate_connections(&self, limits: &LimitsConfig, problems: &mut Vec<String>) {
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        check(
            [
                self.header_read_timeout_secs,
                self.idle_timeout_secs,
                self.handshake_timeout_secs,
            ]
            .iter()
            .all(|secs| (1..=86_400).contains(secs)),
            "server.header_read_timeout_secs, idle_timeout_secs and handshake_timeout_secs \
             must be between 1 and 86400",
        );
        check(
            self.max_connections >= 1 && self.max_connections_per_ip >= 1,
            "server.max_connections and server.max_connections_per_ip must be at least 1",
        );
        if limits.enabled {
            check(
                self.max_connections >= limits.max_connections,
                "server.max_connections must be at least limits.max_connections (each \
                 WebSocket is a TCP connection too)",
            );
            check(
                self.max_connections_per_ip >= limits.max_connections_per_ip,
                "server.max_connections_per_ip must be at least limits.max_connections_per_ip \
                 (each WebSocket is a TCP connection too)",
            );
        }
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;

    fn load(list: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&tests::vars(list))
    }

    #[test]
    fn connection_hygiene_defaults_are_bounded_and_hold_the_websocket_caps() {
        let config = load(&[]).unwrap();
        let server = &config.server;
        assert!((1..=30).contains(&server.header_read_timeout_secs));
        assert!((1..=60).contains(&server.idle_timeout_secs));
        assert!(server.max_connections >= config.limits.max_connections);
        assert!(server.max_connections_per_ip >= config.limits.max_connections_per_ip);
    }

    #[test]
    fn connection_hygiene_mistakes_are_refused() {
        let err = load(&[
            ("CHATGATE_SERVER__IDLE_TIMEOUT_SECS", "0"),
            ("CHATGATE_SERVER__MAX_CONNECTIONS", "10"),
            ("CHATGATE_SERVER__MAX_CONNECTIONS_PER_IP", "10"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("idle_timeout_secs"), "{text}");
        assert!(text.contains("at least limits.max_connections "), "{text}");
        assert!(
            text.contains("at least limits.max_connections_per_ip"),
            "{text}"
        );
        assert_eq!(err.0.len(), 3, "{text}");
        // With limits off, the WebSocket caps do not apply and set no floor.
        assert!(
            load(&[
                ("CHATGATE_LIMITS__ENABLED", "false"),
                ("CHATGATE_SERVER__MAX_CONNECTIONS", "10"),
                ("CHATGATE_SERVER__MAX_CONNECTIONS_PER_IP", "10"),
            ])
            .is_ok()
        );
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// Standalone mode. May hold a password: never print it; use
    /// [`RedisConfig::redacted_url`].
    pub url: String,
    /// Cluster mode: seed nodes (`redis://host:port`); the rest is discovered.
    pub nodes: Vec<String>,
    /// Sentinel mode: the Sentinels (`redis://host:26379`).
    pub sentinels: Vec<String>,
    /// Sentinel mode: the monitored primary's name.
    pub sentinel_master: String,
    /// How often (ms) Sentinel is asked which node is the primary.
    pub sentinel_poll_ms: u64,
    /// Credentials of the data nodes (cluster and Sentinel mode; in standalone mode they
    /// override the URL's).
    pub username: String,
    pub password: Secret,
    /// Credentials of the Sentinels themselves.
    pub sentinel_username: String,
    pub sentinel_password: Secret,
    /// Sentinel mode: the database number (a cluster has only 0).
    pub db: i64,
    /// Put `{channel}` hash tags in key names (always on in cluster mode).
    pub hash_tags: bool,
    /// Replicas that must confirm a message (Redis `WAIT`) before it is acknowledged;
    /// 0 acknowledges once the primary has it.
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    pub command_timeout_ms: u64,
    pub startup_timeout_secs: u64,
    /// Start even when Redis's `maxmemory-policy` can evict chatgate's keys.
    pub allow_evicting_policy: bool,
    /// Fraction of Redis's `maxmemory` past which new media is refused (`storage_full`).
    pub storage_full_ratio: f64,
    /// How often Redis's memory use is read (milliseconds).
    pub memory_check_ms: u64,
}

/// How chatgate reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (or a managed endpoint that looks like one).
    Standalone,
    /// Redis Cluster: keys spread over shards by hash slot; fan-out on sharded pub/sub.
    Cluster,
    /// One primary with replicas, found and followed through Sentinel.
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Cluster => "cluster",
            Self::Sentinel => "sentinel",
        }
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`, safe for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Where Redis is, for logs: the mode and its (redacted) addresses.
    pub fn describe(&self) -> String {
        let redacted = |list: &[String]| {
            list.iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self.mode {
            RedisMode::Standalone => self.redacted_url(),
            RedisMode::Cluster => format!("cluster {}", redacted(&self.nodes)),
            RedisMode::Sentinel => format!(
                "sentinel {} master {}",
                redacted(&self.sentinels),
                self.sentinel_master
            ),
        }
    }

    /// Whether any Redis address is configured for the mode.
    pub fn is_configured(&self) -> bool {
        match self.mode {
            RedisMode::Standalone => !self.url.is_empty(),
            RedisMode::Cluster => !self.nodes.is_empty(),
            RedisMode::Sentinel => !self.sentinels.is_empty(),
        }
    }

    /// Whether keys carry `{channel}` hash tags.
    pub fn tagged_keys(&self) -> bool {
        self.hash_tags || self.mode == RedisMode::Cluster
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field("url", &self.redacted_url())
            .field(
                "nodes",
                &self.nodes.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field(
                "sentinels",
                &self
                    .sentinels
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            .field("password", &self.password)
            .field("sentinel_password", &self.sentinel_password)
            .field("hash_tags", &self.hash_tags)
            .field("wait_replicas", &self.wait_replicas)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("startup_timeout_secs", &self.startup_timeout_secs)
            .finish()
    }
}

/// Which store and bus implementation to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Redis,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    pub history_max: usize,
    /// Bytes of history kept per channel.
    pub channel_max_bytes: usize,
    pub history_ttl_secs: u64,
    pub presence_ttl_secs: u64,
    pub presence_refresh_secs: u64,
    pub typing_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    pub history_default_limit: usize,
    pub history_max_limit: usize,
    pub history_max_bytes: usize,
    pub max_text_bytes: usize,
    pub max_image_bytes: usize,
    pub max_audio_bytes: usize,
    pub max_image_side: u32,
    pub max_image_pixels: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsConfig {
    pub max_message_bytes: usize,
    /// The small cap: every frame but an image or audio message (and every REST body but
    /// one carrying media). 0: derived from `chat.max_text_bytes`.
    pub max_frame_bytes: usize,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    pub max_write_buffer_bytes: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub ping_interval_secs: u64,
    pub pong_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub write_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub enabled: bool,
    pub algorithms: Vec<String>,
    pub hmac_secret: Secret,
    pub public_key_files: Vec<PathBuf>,
    pub jwks_url: String,
    pub jwks_refresh_secs: u64,
    pub jwks_min_refetch_secs: u64,
    pub jwks_timeout_ms: u64,
    pub issuer: String,
    pub audience: Vec<String>,
    pub leeway_secs: u64,
    pub max_token_lifetime_secs: u64,
    pub username_claim: String,
    pub roles_claim: String,
    pub admin_roles: Vec<String>,
    pub channels_claim: String,
    pub query_token_param: String,
}

/// A string that never prints: `Debug` shows only whether it is set.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub allow_credentials: bool,
    pub allow_same_origin: bool,
    pub allow_missing_origin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub enabled: bool,
    pub messages_per_minute: u32,
    pub message_burst: u32,
    pub typing_per_minute: u32,
    pub typing_burst: u32,
    pub connects_per_minute_per_ip: u32,
    pub connect_burst_per_ip: u32,
    pub max_connections_per_ip: u32,
    pub max_connections_per_user: u32,
    pub max_connections: u32,
    pub rest_per_minute_per_ip: u32,
    pub rest_burst_per_ip: u32,
    pub ws_close_after_refused: u32,
    /// Seconds a client address may not open WebSockets after one of its sockets was
    /// closed for refused frames (0: no penalty).
    pub abuse_penalty_secs: u64,
    pub redis_timeout_ms: u64,
    pub headers: bool,
    /// Media bytes per user (decoded data URLs' text, WebSocket and REST together).
    pub media_bytes_per_minute: u64,
    pub media_burst_bytes: u64,
    /// Message deletes per user.
    pub deletes_per_minute: u32,
    pub delete_burst: u32,
    /// Channels a user may create (post the first message of).
    pub channels_per_minute: u32,
    pub channel_burst: u32,
}

/// What one process may hold for large payloads (see [`crate::limits::payload`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of large payloads in flight at once (in and out).
    pub large_payload_budget_bytes: usize,
    /// Milliseconds a large payload waits for room before it is refused.
    pub large_payload_wait_ms: u64,
    /// Seconds a large WebSocket message may take to arrive once admitted.
    pub large_message_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp_endpoint: String,
    pub otlp_protocol: String,
    pub service_name: String,
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    pub enabled: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// Everything that can override the files: flags and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--dev`.
    pub dev: bool,
    /// `--environment`; otherwise `CHATGATE_ENVIRONMENT`; otherwise `development` with
    /// `--dev` and `production` without.
    pub environment: Option<String>,
    /// `--config-dir`; otherwise `CHATGATE_CONFIG_DIR`; otherwise `config`.
    pub config_dir: Option<PathBuf>,
    /// `--config FILE`, layered after the environment file.
    pub config_file: Option<PathBuf>,
    /// Environment variables (the process's, or a test's own list).
    pub vars: Vec<(String, String)>,
    /// Flags that set single keys, as `(section, key, value)`; applied last.
    pub flags: Vec<(&'static str, &'static str, Value)>,
}

/// Every problem found while loading, reported together.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Layers every source and validates the result.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every unreadable file, unknown key, mistyped value and
    /// invalid setting found.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let schema: Table = DEFAULT_TOML
            .parse()
            .expect("config/default.toml is valid TOML");
        let mut merged = schema.clone();

        let var = |name: &str| {
            overrides
                .vars
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let environment = overrides
            .environment
            .clone()
            .or_else(|| var("CHATGATE_ENVIRONMENT"))
            .unwrap_or_else(|| {
                if overrides.dev {
                    "development".into()
                } else {
                    "production".into()
                }
            });
        let config_dir = overrides
            .config_dir
            .clone()
            .or_else(|| var("CHATGATE_CONFIG_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("config"));

        let env_file = config_dir.join(format!("{environment}.toml"));
        if env_file.exists() {
            merge_file(&schema, &mut merged, &env_file, &mut problems);
        }
        if let Some(file) = &overrides.config_file {
            if file.exists() {
                merge_file(&schema, &mut merged, file, &mut problems);
            } else {
                problems.push(format!("--config {}: file not found", file.display()));
            }
        }

        if overrides.dev {
            // Dev defaults; environment variables and flags may still override them.
            set(&mut merged, "log", "format", Value::String("text".into()));
        }
        apply_seed_vars(&overrides.vars, &mut merged, &mut problems);
        for (name, value) in &overrides.vars {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if path == "ENVIRONMENT" || path == "CONFIG_DIR" {
                continue;
            }
            if is_service_link(path) {
                warnings.push(format!(
                    "ignoring {name}: it looks like a Kubernetes service link, not a \
                     configuration variable (those are {ENV_PREFIX}<SECTION>__<KEY>)"
                ));
                continue;
            }
            let Some((section, key)) = path.split_once("__") else {
                problems.push(format!(
                    "{name}: not a configuration variable (expected {ENV_PREFIX}<SECTION>__<KEY>)"
                ));
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            match schema_value(&schema, &section, &key) {
                Some(shape) => match parse_like(shape, value) {
                    Ok(v) => set(&mut merged, &section, &key, v),
                    Err(e) => problems.push(format!("{name}: {e}")),
                },
                None => problems.push(format!("{name}: unknown key {section}.{key}")),
            }
        }
        if overrides.dev {
            // --dev is a flag: it wins over files and variables.
            set(&mut merged, "auth", "enabled", Value::Boolean(false));
        }
        for (section, key, value) in &overrides.flags {
            set(&mut merged, section, key, value.clone());
        }

        let config = match Config::deserialize(Value::Table(merged)) {
            Ok(mut config) => {
                config.derive_sizes();
                config.instance_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
                config.dev = overrides.dev;
                config.environment = environment;
                config.warnings = warnings;
                if config.auth.enabled
                    && (config.auth.issuer.is_empty() || config.auth.audience.is_empty())
                {
                    config.warnings.push(
                        "auth.issuer or auth.audience is not set: any token your keys verify is \
                         accepted, including tokens the issuer made for other applications"
                            .into(),
                    );
                }
                Some(config)
            }
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        if let Some(config) = &config {
            config.validate(&mut problems);
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError(problems)),
        }
    }

    /// The media limits as the content checks take them.
    pub fn media_limits(&self) -> crate::content::MediaLimits {
        crate::content::MediaLimits {
            max_image_bytes: self.chat.max_image_bytes,
            max_audio_bytes: self.chat.max_audio_bytes,
            max_image_pixels: self.chat.max_image_pixels,
            max_image_side: self.chat.max_image_side,
        }
    }

    /// Fills the size keys left at 0 from the media limits, so one setting (the largest
    /// media) sizes the socket and body limits that must hold it.
    fn derive_sizes(&mut self) {
        const JSON_ROOM: usize = 16 * 1024;
        let largest = crate::content::max_encoded_len(&self.media_limits())
            .max(self.chat.max_text_bytes * 6)
            + JSON_ROOM;
        if self.ws.max_message_bytes == 0 {
            self.ws.max_message_bytes = largest;
        }
        if self.ws.max_frame_bytes == 0 {
            // Raw text may be twice the stored limit (markup is stripped), and JSON can
            // escape each byte as six (\u00XX); plus room for the other fields.
            self.ws.max_frame_bytes = self.chat.max_text_bytes * 12 + 4096;
        }
        if self.server.max_body_bytes == 0 {
            self.server.max_body_bytes = largest;
        }
        if self.ws.outbound_queue_bytes == 0 {
            self.ws.outbound_queue_bytes = (4 << 20).max(2 * self.ws.max_message_bytes);
        }
        if self.ws.max_write_buffer_bytes == 0 {
            self.ws.max_write_buffer_bytes =
                self.ws.write_buffer_bytes + self.ws.max_message_bytes + (1 << 20);
        }
    }

    /// Cross-field checks; pushes one line per problem.
    fn validate(&self, problems: &mut Vec<String>) {
        self.validate_redis(problems);
        self.server.validate_connections(&self.limits, problems);
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                problems.push(msg.to_string());
            }
        };
        check(
            self.store.history_max >= 1,
            "store.history_max must be at least 1",
        );
        check(
            self.store.channel_max_bytes >= self.chat.max_text_bytes.max(1024),
            "store.channel_max_bytes must be at least chat.max_text_bytes (and 1024)",
        );
        check(
            self.redis.storage_full_ratio > 0.0 && self.redis.storage_full_ratio <= 1.0,
            "redis.storage_full_ratio must be above 0 and at most 1",
        );
        check(
            self.redis.memory_check_ms >= 100,
            "redis.memory_check_ms must be at least 100",
        );
        check(
            (1..=self.store.history_max).contains(&self.chat.history_max_limit),
            "chat.history_max_limit must be between 1 and store.history_max",
        );
        check(
            (1..=self.chat.history_max_limit).contains(&self.chat.history_default_limit),
            "chat.history_default_limit must be between 1 and chat.history_max_limit",
        );
        check(
            self.store.history_ttl_secs >= 1,
            "store.history_ttl_secs must be at least 1",
        );
        check(
            self.store.presence_ttl_secs >= 2,
            "store.presence_ttl_secs must be at least 2",
        );
        check(
            self.store.presence_refresh_secs >= 1
                && self.store.presence_refresh_secs * 2 <= self.store.presence_ttl_secs,
            "store.presence_refresh_secs must be at least 1 and at most half of store.presence_ttl_secs",
        );
        check(
            self.store.typing_ttl_secs >= 1,
            "store.typing_ttl_secs must be at least 1",
        );
        check(
            self.chat.max_text_bytes >= 1,
            "chat.max_text_bytes must be at least 1",
        );
        check(
            matches!(
                self.telemetry.otlp_protocol.as_str(),
                "grpc" | "http/protobuf"
            ),
            "telemetry.otlp_protocol must be \"grpc\" or \"http/protobuf\"",
        );
        check(
            (0.0..=1.0).contains(&self.telemetry.sample_ratio),
            "telemetry.sample_ratio must be between 0 and 1",
        );
        check(
            self.telemetry.otlp_endpoint.is_empty()
                || self.telemetry.otlp_endpoint.starts_with("http://")
                || self.telemetry.otlp_endpoint.starts_with("https://"),
            "telemetry.otlp_endpoint must be an http(s):// URL",
        );
        check(
            self.chat.history_max_bytes >= 65536,
            "chat.history_max_bytes must be at least 65536",
        );
        let media = crate::content::max_encoded_len(&self.media_limits());
        check(
            self.ws.max_message_bytes > media.max(self.chat.max_text_bytes),
            "ws.max_message_bytes must be larger than the longest valid media data URL \
             (from chat.max_image_bytes and chat.max_audio_bytes) and chat.max_text_bytes; \
             leave it 0 to derive it",
        );
        check(
            self.server.max_body_bytes > media.max(self.chat.max_text_bytes),
            "server.max_body_bytes must be larger than the longest valid media data URL \
             (from chat.max_image_bytes and chat.max_audio_bytes) and chat.max_text_bytes; \
             leave it 0 to derive it",
        );
        check(
            self.chat.max_image_bytes >= 1
                && self.chat.max_audio_bytes >= 1
                && self.chat.max_image_side >= 1
                && self.chat.max_image_pixels >= 1,
            "chat.max_image_bytes, max_audio_bytes, max_image_side and max_image_pixels must be at least 1",
        );
        let l = &self.limits;
        check(
            [
                l.messages_per_minute,
                l.message_burst,
                l.typing_per_minute,
                l.typing_burst,
                l.connects_per_minute_per_ip,
                l.connect_burst_per_ip,
                l.max_connections_per_ip,
                l.max_connections_per_user,
                l.max_connections,
                l.rest_per_minute_per_ip,
                l.rest_burst_per_ip,
                l.ws_close_after_refused,
                l.deletes_per_minute,
                l.delete_burst,
                l.channels_per_minute,
                l.channel_burst,
            ]
            .iter()
            .all(|v| *v >= 1)
                && l.redis_timeout_ms >= 1
                && l.media_bytes_per_minute >= 1,
            "every limits.* rate, burst and cap must be at least 1 (turn limits off with limits.enabled = false)",
        );
        check(
            l.media_burst_bytes >= media as u64,
            "limits.media_burst_bytes must be at least the longest valid media data URL \
             (from chat.max_image_bytes and chat.max_audio_bytes), or no media could be sent",
        );
        check(
            self.ws.max_frame_bytes >= 1024 && self.ws.max_frame_bytes < self.ws.max_message_bytes,
            "ws.max_frame_bytes must be at least 1024 and below ws.max_message_bytes",
        );
        let budget = self.memory.large_payload_budget_bytes;
        check(
            budget >= self.ws.max_message_bytes && budget >= self.server.max_body_bytes,
            "memory.large_payload_budget_bytes must be at least ws.max_message_bytes and \
             server.max_body_bytes (one largest payload must fit)",
        );
        check(
            self.memory.large_payload_wait_ms >= 1 && self.memory.large_message_timeout_secs >= 1,
            "memory.large_payload_wait_ms and memory.large_message_timeout_secs must be at least 1",
        );
        check(
            self.ws.read_buffer_bytes >= 256,
            "ws.read_buffer_bytes must be at least 256",
        );
        check(
            self.ws.outbound_queue >= 4,
            "ws.outbound_queue must be at least 4",
        );
        check(
            self.ws.outbound_queue_bytes >= 2 * self.ws.max_message_bytes,
            "ws.outbound_queue_bytes must be at least twice ws.max_message_bytes (so one \
             large frame behind others does not evict a reader that keeps up)",
        );
        check(
            self.ws.ping_interval_secs >= 1 && self.ws.pong_timeout_secs >= 1,
            "ws.ping_interval_secs and ws.pong_timeout_secs must be at least 1",
        );
        check(
            self.ws.write_timeout_secs >= 1,
            "ws.write_timeout_secs must be at least 1",
        );
        check(
            self.ws.write_delay_ms <= 1000,
            "ws.write_delay_ms must be at most 1000",
        );
        check(
            self.ws.max_write_buffer_bytes > self.ws.write_buffer_bytes + self.ws.max_message_bytes,
            "ws.max_write_buffer_bytes must exceed ws.write_buffer_bytes + ws.max_message_bytes",
        );
        check(
            self.server.request_timeout_secs >= 1,
            "server.request_timeout_secs must be at least 1",
        );
        check(
            self.redis.connect_timeout_ms >= 1 && self.redis.command_timeout_ms >= 1,
            "redis.connect_timeout_ms and redis.command_timeout_ms must be at least 1",
        );
        check(
            !self.redis.key_prefix.contains(['{', '}', ' ']),
            "redis.key_prefix must not contain braces or spaces",
        );
        match self.store.backend {
            Backend::Redis => check(
                self.redis.is_configured(),
                "store.backend = \"redis\" needs redis.url (or REDIS_URL / REDIS_HOST), \
                 redis.nodes (cluster) or redis.sentinels (sentinel)",
            ),
            Backend::Auto => check(
                self.dev || self.redis.is_configured(),
                "no Redis configured: set redis.url (or REDIS_URL / REDIS_HOST), or choose \
                 store.backend = \"memory\" for a single process, or run with --dev",
            ),
            Backend::Memory => {}
        }
        check(
            !self.dev || self.server.allow_dev_mode,
            "--dev is forbidden here (server.allow_dev_mode = false): authentication stays on",
        );
        for proxy in &self.server.trusted_proxies {
            check(
                crate::http::client_ip::parse_net(proxy).is_some(),
                &format!("server.trusted_proxies: {proxy:?} is not an IP address or CIDR"),
            );
        }
        if self.auth.enabled {
            self.validate_auth(problems);
        }
        for origin in &self.cors.allowed_origins {
            if origin.trim() == "*" {
                problems.push(
                    "cors.allowed_origins: \"*\" is refused: list the exact origins of your web apps"
                        .to_string(),
                );
            } else if crate::http::origin::normalize(origin).is_none() {
                problems.push(format!(
                    "cors.allowed_origins: {origin:?} is not an exact origin (http(s)://host[:port], no path)"
                ));
            }
        }
    }

    fn validate_auth(&self, problems: &mut Vec<String>) {
        let auth = &self.auth;
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        let mut hmac = false;
        let mut public = false;
        for name in &auth.algorithms {
            match crate::auth::parse_algorithm(name) {
                Some(alg) if crate::auth::is_hmac(alg) => hmac = true,
                Some(_) => public = true,
                None => check(
                    false,
                    &format!(
                        "auth.algorithms: {name:?} is not a supported algorithm (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
                    ),
                ),
            }
        }
        check(
            !auth.algorithms.is_empty(),
            "auth.algorithms is empty: list the algorithms your issuer signs with",
        );
        check(
            !(hmac && public),
            "auth.algorithms mixes HS* with public-key algorithms: an HMAC secret and public keys must not verify the same tokens (key confusion)",
        );
        if hmac {
            check(
                auth.hmac_secret.expose().len() >= 32,
                "auth.hmac_secret must be at least 32 bytes for HS* algorithms (CHATGATE_AUTH__HMAC_SECRET)",
            );
        }
        if public {
            check(
                !auth.public_key_files.is_empty() || !auth.jwks_url.is_empty(),
                "auth.enabled = true needs keys: set auth.jwks_url (your issuer's JWKS) or auth.public_key_files, or auth.hmac_secret with HS256; or run with --dev",
            );
        }
        if !auth.jwks_url.is_empty() {
            check(
                auth.jwks_url.starts_with("https://") || auth.jwks_url.starts_with("http://"),
                "auth.jwks_url must be an http(s) URL",
            );
        }
        check(
            auth.jwks_refresh_secs >= 1
                && auth.jwks_min_refetch_secs >= 1
                && auth.jwks_timeout_ms >= 1,
            "auth.jwks_refresh_secs, auth.jwks_min_refetch_secs and auth.jwks_timeout_ms must be at least 1",
        );
        check(
            auth.leeway_secs <= 300,
            "auth.leeway_secs must be at most 300",
        );
        check(
            auth.max_token_lifetime_secs >= 60,
            "auth.max_token_lifetime_secs must be at least 60",
        );
        check(
            !auth.username_claim.is_empty(),
            "auth.username_claim must name a claim (sub is the fallback)",
        );
        check(
            auth.query_token_param.is_empty()
                || auth
                    .query_token_param
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "auth.query_token_param must be letters, digits and _",
        );
    }

    /// Whether this process runs on Redis (otherwise on the in-memory store and bus).
    pub fn uses_redis(&self) -> bool {
        match self.store.backend {
            Backend::Redis => true,
            Backend::Memory => false,
            Backend::Auto => self.redis.is_configured(),
        }
    }

    fn validate_redis(&self, problems: &mut Vec<String>) {
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                problems.push(msg.to_string());
            }
        };
        let r = &self.redis;
        let plain = |u: &String| u.starts_with("redis://");
        if !r.url.is_empty() {
            check(
                plain(&r.url),
                "redis.url must start with redis:// (TLS, rediss://, is not supported by this build)",
            );
        }
        for (key, list) in [("nodes", &r.nodes), ("sentinels", &r.sentinels)] {
            check(
                list.iter().all(plain),
                &format!("redis.{key}: every address must start with redis://"),
            );
            check(
                list.iter().all(|u| !u.contains('@')),
                &format!(
                    "redis.{key}: no credentials in addresses; use redis.password / \
                     redis.sentinel_password (from a secret)"
                ),
            );
        }
        check(r.db >= 0, "redis.db must not be negative");
        match r.mode {
            RedisMode::Standalone => {
                check(
                    r.nodes.is_empty() && r.sentinels.is_empty(),
                    "redis.nodes and redis.sentinels need redis.mode = \"cluster\" or \"sentinel\"",
                );
                check(
                    r.db == 0,
                    "redis.db is for sentinel mode; in standalone mode the database is in redis.url",
                );
            }
            RedisMode::Cluster => {
                check(
                    r.url.is_empty() && r.sentinels.is_empty(),
                    "redis.mode = \"cluster\" takes redis.nodes, not redis.url or redis.sentinels",
                );
                check(
                    r.wait_replicas == 0,
                    "redis.wait_replicas is not supported in cluster mode",
                );
                check(r.db == 0, "redis.db must be 0 in cluster mode");
            }
            RedisMode::Sentinel => {
                check(
                    r.url.is_empty() && r.nodes.is_empty(),
                    "redis.mode = \"sentinel\" takes redis.sentinels, not redis.url or redis.nodes",
                );
                check(
                    !r.sentinel_master.is_empty(),
                    "redis.sentinel_master must name the monitored primary",
                );
                check(
                    r.sentinel_poll_ms >= 100,
                    "redis.sentinel_poll_ms must be at least 100",
                );
            }
        }
        check(
            r.wait_replicas == 0
                || (r.wait_timeout_ms >= 1 && r.wait_timeout_ms < r.command_timeout_ms),
            "redis.wait_timeout_ms must be at least 1 and below redis.command_timeout_ms \
             when redis.wait_replicas is set",
        );
    }
}

/// Merges one TOML file into `merged`, flagging keys the schema does not know.
fn merge_file(schema: &Table, merged: &mut Table, path: &Path, problems: &mut Vec<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            problems.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    let table: Table = match text.parse() {
        Ok(table) => table,
        Err(e) => {
            problems.push(format!("{}: {e}", path.display()));
            return;
        }
    };
    for (section, body) in table {
        let Value::Table(body) = body else {
            problems.push(format!(
                "{}: top-level key {section:?} must be a [section]",
                path.display()
            ));
            continue;
        };
        for (key, value) in body {
            if schema_value(schema, &section, &key).is_none() {
                problems.push(format!("{}: unknown key {section}.{key}", path.display()));
                continue;
            }
            set(merged, &section, &key, value);
        }
    }
}

/// The original service's variables: `REDIS_URL`, or `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB`
/// composed into a URL, and `API_HOST`/`API_PORT`.
fn apply_seed_vars(vars: &[(String, String)], merged: &mut Table, problems: &mut Vec<String>) {
    // Kubernetes injects REDIS_PORT=tcp://10.0.0.7:6379 for a Service named "redis"; that
    // is not the original's variable, so such values are ignored.
    let var = |name: &str| {
        vars.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.starts_with("tcp://") && !v.starts_with("udp://"))
    };
    if let Some(url) = var("REDIS_URL").filter(|u| !u.is_empty()) {
        set(merged, "redis", "url", Value::String(url.into()));
    } else if var("REDIS_HOST").is_some()
        || var("REDIS_PORT").is_some()
        || var("REDIS_DB").is_some()
    {
        let host = var("REDIS_HOST").unwrap_or("localhost");
        let port = var("REDIS_PORT").unwrap_or("6379");
        let db = var("REDIS_DB").unwrap_or("0");
        if port.parse::<u16>().is_err() {
            problems.push(format!("REDIS_PORT: {port:?} is not a port number"));
        }
        if db.parse::<u32>().is_err() {
            problems.push(format!("REDIS_DB: {db:?} is not a database number"));
        }
        set(
            merged,
            "redis",
            "url",
            Value::String(format!("redis://{host}:{port}/{db}")),
        );
    }
    // The OpenTelemetry SDK's standard variables.
    let otel = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "otlp_endpoint"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "otlp_protocol"),
        ("OTEL_SERVICE_NAME", "service_name"),
    ];
    for (name, key) in otel.iter().rev() {
        if let Some(value) = var(name).filter(|v| !v.is_empty()) {
            set(merged, "telemetry", key, Value::String(value.into()));
        }
    }
    if let Some(ratio) = var("OTEL_TRACES_SAMPLER_ARG") {
        match ratio.parse::<f64>() {
            Ok(r) => set(merged, "telemetry", "sample_ratio", Value::Float(r)),
            Err(_) => problems.push(format!(
                "OTEL_TRACES_SAMPLER_ARG: {ratio:?} is not a number"
            )),
        }
    }
    if let Some(host) = var("API_HOST") {
        set(merged, "server", "host", Value::String(host.into()));
    }
    if let Some(port) = var("API_PORT") {
        match port.parse::<u16>() {
            Ok(p) => set(merged, "server", "port", Value::Integer(p.into())),
            Err(_) => problems.push(format!("API_PORT: {port:?} is not a port number")),
        }
    }
}

/// Variables Kubernetes injects for Services whose names start with `chatgate`
/// (`CHATGATE_PORT`, `CHATGATE_PORT_8000_TCP_ADDR`, `CHATGATE_SERVICE_HOST`,
/// `CHATGATE_ADMIN_SERVICE_PORT_HTTP`, ...): not configuration. `path` is the part after
/// `CHATGATE_`; configuration variables always contain `__`, these never do.
fn is_service_link(path: &str) -> bool {
    if path.contains("__") {
        return false;
    }
    let words: Vec<&str> = path.split('_').collect();
    words
        .windows(2)
        .any(|w| w == ["SERVICE", "HOST"] || w == ["SERVICE", "PORT"])
        || words.last() == Some(&"PORT")
        || words.windows(3).any(|w| {
            w[0] == "PORT"
                && !w[1].is_empty()
                && w[1].bytes().all(|b| b.is_ascii_digit())
                && matches!(w[2], "TCP" | "UDP" | "SCTP")
        })
}

fn schema_value<'a>(schema: &'a Table, section: &str, key: &str) -> Option<&'a Value> {
    schema.get(section)?.as_table()?.get(key)
}

fn set(merged: &mut Table, section: &str, key: &str, value: Value) {
    if let Some(Value::Table(body)) = merged.get_mut(section) {
        body.insert(key.to_string(), value);
    }
}

/// Parses an environment string into the TOML type of the key's default value.
fn parse_like(shape: &Value, raw: &str) -> Result<Value, String> {
    match shape {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("{raw:?} is not a number")),
        Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not a boolean")),
        },
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        )),
        _ => Err("this key cannot be set from the environment".into()),
    }
}

/// Replaces the password (and a bare username used as one) in a URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user info ends at the last '@' (a password may hold '/' or '@').
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or("");
            let shown = if user.is_empty() {
                "***".to_string()
            } else {
                format!("{user}:***")
            };
            format!("{scheme}://{shown}@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn vars(list: &[(&str, &str)]) -> Overrides {
        Overrides {
            dev: true,
            config_dir: Some(PathBuf::from("/nonexistent")),
            vars: list
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Overrides::default()
        }
    }

    #[test]
    fn defaults_load_in_dev_mode() {
        let config = Config::load(&vars(&[])).unwrap();
        assert_eq!(config.server.port, 8000);
        assert_eq!(config.store.history_max, 1000);
        assert!(!config.auth.enabled);
        assert!(!config.uses_redis());
        assert_eq!(config.environment, "development");
    }

    #[test]
    fn env_vars_are_typed_by_the_schema() {
        let config = Config::load(&vars(&[
            ("CHATGATE_SERVER__PORT", "9100"),
            (
                "CHATGATE_CORS__ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
            ("CHATGATE_REDIS__URL", "redis://r:6379/2"),
        ]))
        .unwrap();
        assert_eq!(config.server.port, 9100);
        assert_eq!(
            config.cors.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert!(config.uses_redis());
    }

    #[test]
    fn seed_variables_compose_a_redis_url_and_chatgate_ones_win() {
        let config = Config::load(&vars(&[
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "3"),
            ("API_PORT", "8080"),
        ]))
        .unwrap();
        assert_eq!(config.redis.url, "redis://cache:6380/3");
        assert_eq!(config.server.port, 8080);

        let config = Config::load(&vars(&[
            ("API_PORT", "8080"),
            ("CHATGATE_SERVER__PORT", "9000"),
        ]))
        .unwrap();
        assert_eq!(config.server.port, 9000);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::load(&vars(&[
            ("CHATGATE_SERVER__PORT", "eighty"),
            ("CHATGATE_NOPE__KEY", "1"),
            ("CHATGATE_CHAT__HISTORY_MAX_LIMIT", "5000"),
            ("API_PORT", "99999"),
            ("CHATGATE_CORS__ALLOWED_ORIGINS", "*"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("CHATGATE_SERVER__PORT"), "{text}");
        assert!(text.contains("unknown key nope.key"), "{text}");
        assert!(text.contains("API_PORT"), "{text}");
        assert!(text.contains("chat.history_max_limit"), "{text}");
        assert!(text.contains(r#""*" is refused"#), "{text}");
        assert_eq!(err.0.len(), 5, "{text}");

        let err = Config::load(&vars(&[
            ("CHATGATE_CHAT__HISTORY_MAX_LIMIT", "5000"),
            (
                "CHATGATE_CORS__ALLOWED_ORIGINS",
                "*,https://ok.example/path",
            ),
        ]))
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }

    #[test]
    fn production_without_redis_or_auth_decision_refuses_to_start() {
        let overrides = Overrides {
            config_dir: Some(PathBuf::from("/nonexistent")),
            ..Overrides::default()
        };
        let err = Config::load(&overrides).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no Redis configured"), "{text}");
        assert!(text.contains("auth.enabled = true needs keys"), "{text}");
    }

    fn production(list: &[(&str, &str)]) -> Overrides {
        let mut all = vec![("CHATGATE_STORE__BACKEND", "memory")];
        all.extend_from_slice(list);
        Overrides {
            dev: false,
            ..vars(&all)
        }
    }

    #[test]
    fn auth_settings_are_checked_together() {
        let secret = "0123456789abcdef0123456789abcdef";
        assert!(
            Config::load(&production(&[
                ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
                ("CHATGATE_AUTH__HMAC_SECRET", secret),
            ]))
            .is_ok()
        );
        assert!(
            Config::load(&production(&[
                ("CHATGATE_AUTH__ALGORITHMS", "ES256,EdDSA"),
                ("CHATGATE_AUTH__JWKS_URL", "https://idp.example/certs"),
            ]))
            .is_ok()
        );
        let problems =
            |list: &[(&str, &str)]| Config::load(&production(list)).unwrap_err().to_string();
        let text = problems(&[
            ("CHATGATE_AUTH__ALGORITHMS", "HS256,RS256,none"),
            ("CHATGATE_AUTH__HMAC_SECRET", "short"),
            ("CHATGATE_AUTH__JWKS_URL", "ftp://idp.example/certs"),
        ]);
        assert!(
            text.contains("\"none\" is not a supported algorithm"),
            "{text}"
        );
        assert!(text.contains("mixes HS* with public-key"), "{text}");
        assert!(text.contains("at least 32 bytes"), "{text}");
        assert!(text.contains("jwks_url must be an http(s) URL"), "{text}");
        let text = problems(&[("CHATGATE_AUTH__ALGORITHMS", "")]);
        assert!(text.contains("auth.algorithms is empty"), "{text}");
        let text = problems(&[
            ("CHATGATE_AUTH__ENABLED", "false"),
            ("CHATGATE_SERVER__TRUSTED_PROXIES", "10.0.0.0/8,not-a-net"),
        ]);
        assert!(
            text.contains("\"not-a-net\" is not an IP address or CIDR"),
            "{text}"
        );
        assert!(!text.contains("10.0.0.0/8"), "{text}");
    }

    #[test]
    fn standard_otel_variables_configure_tracing() {
        let config = Config::load(&vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "chat-eu"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]))
        .unwrap();
        let t = &config.telemetry;
        assert_eq!(t.otlp_endpoint, "http://collector:4317");
        assert_eq!(t.otlp_protocol, "http/protobuf");
        assert_eq!(t.service_name, "chat-eu");
        assert!((t.sample_ratio - 0.25).abs() < f64::EPSILON);
        // The traces-specific endpoint wins over the generic one; chatgate's own wins over both.
        let config = Config::load(&vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]))
        .unwrap();
        assert_eq!(config.telemetry.otlp_endpoint, "http://traces:4317");
        let config = Config::load(&vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("CHATGATE_TELEMETRY__OTLP_ENDPOINT", "http://mine:4317"),
        ]))
        .unwrap();
        assert_eq!(config.telemetry.otlp_endpoint, "http://mine:4317");
        let err = Config::load(&vars(&[
            ("OTEL_TRACES_SAMPLER_ARG", "lots"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
        assert!(err.contains("telemetry.otlp_protocol"), "{err}");
    }

    #[test]
    fn a_secret_never_prints() {
        let config = Config::load(&production(&[
            ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
            (
                "CHATGATE_AUTH__HMAC_SECRET",
                "0123456789abcdef0123456789abcdef",
            ),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn production_config_can_forbid_dev_mode() {
        let err = Config::load(&vars(&[("CHATGATE_SERVER__ALLOW_DEV_MODE", "false")])).unwrap_err();
        assert!(err.to_string().contains("--dev is forbidden"), "{err}");
        // The shipped production environment forbids it.
        let shipped = Overrides {
            dev: true,
            environment: Some("production".into()),
            config_dir: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")),
            ..Overrides::default()
        };
        let err = Config::load(&shipped).unwrap_err();
        assert!(err.to_string().contains("--dev is forbidden"), "{err}");
    }

    #[test]
    fn kubernetes_service_link_variables_are_ignored() {
        let config = Config::load(&vars(&[
            ("CHATGATE_PORT", "tcp://10.0.0.5:8000"),
            ("CHATGATE_PORT_8000_TCP_ADDR", "10.0.0.5"),
            ("CHATGATE_SERVICE_HOST", "10.0.0.5"),
            ("CHATGATE_ADMIN_SERVICE_HOST", "10.0.0.6"),
            ("CHATGATE_ADMIN_SERVICE_PORT_METRICS", "9090"),
            ("CHATGATE_ADMIN_PORT", "tcp://10.0.0.6:9090"),
            ("CHATGATE_ADMIN_PORT_9090_TCP_PROTO", "tcp"),
            ("REDIS_PORT", "tcp://10.0.0.7:6379"),
        ]))
        .unwrap();
        assert!(config.redis.url.is_empty(), "{}", config.redis.url);
        assert_eq!(config.server.port, 8000);
        assert_eq!(config.warnings.len(), 7, "{:?}", config.warnings);
        // A mistyped configuration variable is still an error.
        let err = Config::load(&vars(&[("CHATGATE_SERVERPORT", "1")])).unwrap_err();
        assert!(err.to_string().contains("CHATGATE_SERVERPORT"), "{err}");
    }

    #[test]
    fn tls_urls_are_refused_up_front() {
        let err = Config::load(&vars(&[("REDIS_URL", "rediss://cache:6380/0")])).unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }

    #[test]
    fn dev_log_format_is_a_default_but_auth_off_is_forced() {
        let config = Config::load(&vars(&[
            ("CHATGATE_LOG__FORMAT", "json"),
            ("CHATGATE_AUTH__ENABLED", "true"),
        ]))
        .unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(!config.auth.enabled);
    }

    #[test]
    fn cluster_and_sentinel_modes_are_configured_by_their_own_keys() {
        let config = Config::load(&vars(&[
            ("CHATGATE_REDIS__MODE", "cluster"),
            ("CHATGATE_REDIS__NODES", "redis://a:6379, redis://b:6379"),
            ("CHATGATE_REDIS__PASSWORD", "s3cret"),
        ]))
        .unwrap();
        assert_eq!(config.redis.mode, RedisMode::Cluster);
        assert_eq!(config.redis.nodes, ["redis://a:6379", "redis://b:6379"]);
        assert!(config.uses_redis());
        assert!(
            config.redis.tagged_keys(),
            "cluster keys always carry hash tags"
        );
        assert_eq!(
            config.redis.describe(),
            "cluster redis://a:6379,redis://b:6379"
        );
        assert!(!format!("{:?}", config.redis).contains("s3cret"));

        let config = Config::load(&vars(&[
            ("CHATGATE_REDIS__MODE", "sentinel"),
            ("CHATGATE_REDIS__SENTINELS", "redis://s1:26379"),
            ("CHATGATE_REDIS__SENTINEL_MASTER", "chat"),
        ]))
        .unwrap();
        assert!(config.uses_redis());
        assert!(!config.redis.tagged_keys());
        assert_eq!(
            config.redis.describe(),
            "sentinel redis://s1:26379 master chat"
        );
    }

    #[test]
    fn redis_mode_mistakes_are_refused() {
        let refused = |list: &[(&str, &str)], needle: &str| {
            let err = Config::load(&vars(list)).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        };
        refused(&[("CHATGATE_REDIS__MODE", "ring")], "redis.mode");
        refused(
            &[
                ("CHATGATE_REDIS__MODE", "cluster"),
                ("CHATGATE_REDIS__URL", "redis://a:6379"),
            ],
            "takes redis.nodes",
        );
        refused(
            &[
                ("CHATGATE_REDIS__MODE", "cluster"),
                ("CHATGATE_REDIS__NODES", "redis://:hunter2@a:6379"),
            ],
            "no credentials in addresses",
        );
        refused(
            &[
                ("CHATGATE_REDIS__MODE", "cluster"),
                ("CHATGATE_REDIS__NODES", "redis://a:6379"),
                ("CHATGATE_REDIS__WAIT_REPLICAS", "1"),
            ],
            "wait_replicas",
        );
        refused(
            &[
                ("CHATGATE_REDIS__MODE", "sentinel"),
                ("CHATGATE_REDIS__SENTINELS", "rediss://s:26379"),
            ],
            "must start with redis://",
        );
        refused(
            &[
                ("CHATGATE_REDIS__MODE", "sentinel"),
                ("CHATGATE_STORE__BACKEND", "redis"),
            ],
            "redis.sentinels",
        );
    }

    #[test]
    fn redis_passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(
            redact_url("redis://user:s3cret@cache/1"),
            "redis://user:***@cache/1"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact_url("redis://:pa/s@s@h:1/0"), "redis://***@h:1/0");
        let config = Config::load(&vars(&[("REDIS_URL", "redis://:pw@h:1/0")])).unwrap();
        assert!(!format!("{config:?}").contains("pw@"));
    }
}
