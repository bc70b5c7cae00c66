//! How chatgate reaches Redis in each `redis.mode` (see docs/redis.md):
//!
//! - **standalone**: one multiplexed [`ConnectionManager`] (reconnects by itself) for
//!   commands, and a plain client for the bus's pub/sub connection;
//! - **cluster**: one [`ClusterConnection`] (RESP3) that routes each command by its first
//!   key, follows `MOVED`/`ASK` and topology changes, and carries the bus's sharded
//!   subscriptions, whose messages come back as pushes;
//! - **sentinel**: a [`SentinelPrimary`] that asks the Sentinels which node is the primary
//!   every `redis.sentinel_poll_ms` (at once after a failed command), checks that node's
//!   `ROLE`, and swaps the command connection when the primary changes; the bus watches
//!   the same value and moves its subscriptions along.
//!
//! [`Conn`] hides the difference from the store: every script runs through it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, Value};
use redis::{ProtocolVersion, PushInfo, RedisFuture, ServerErrorKind};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{RedisConfig, RedisMode, redact_url};

/// The command connection, whatever the mode. Cheap to clone (handles to shared
/// connections).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelPrimary>),
}

/// What the bus subscribes through.
pub enum BusSource {
    /// Standalone: a fixed server.
    Fixed(redis::Client),
    /// Sentinel: whichever node is the primary now.
    Sentinel(Arc<SentinelPrimary>),
    /// Cluster: sharded subscriptions on the cluster connection; messages arrive on
    /// `pushes` (including a `Disconnection` push when a node's connection drops).
    Cluster {
        conn: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
    },
}

/// A connected Redis: the command connection and the bus's source.
pub struct Upstream {
    pub conn: Conn,
    pub bus: BusSource,
}

fn no_primary() -> RedisError {
    RedisError::from((ErrorKind::Io, "no Redis primary known (Sentinel failover?)"))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(primary) => Box::pin(async move {
                let mut conn = primary.conn().ok_or_else(no_primary)?;
                let result = conn.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    primary.suspect(e);
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(primary) => Box::pin(async move {
                let mut conn = primary.conn().ok_or_else(no_primary)?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &result {
                    primary.suspect(e);
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(primary) => primary.db,
        }
    }
}

/// A node's connection info: the address from `url`, credentials from the config (when
/// set, they win over the URL's).
fn node_info(
    url: &str,
    username: &str,
    password: &str,
    db: Option<i64>,
) -> Result<ConnectionInfo, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{}: {e}", redact_url(url)))?;
    let mut settings = info.redis_settings().clone();
    if !username.is_empty() {
        settings = settings.set_username(username);
    }
    if !password.is_empty() {
        settings = settings.set_password(password);
    }
    if let Some(db) = db {
        settings = settings.set_db(db);
    }
    Ok(info.set_redis_settings(settings))
}

fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(config.command_timeout_ms)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(2000))
}

/// Connects in the configured mode, retrying for `redis.startup_timeout_secs` before
/// giving up. Sentinel mode also starts the task that follows the primary.
///
/// # Errors
/// A message naming the (redacted) addresses and the last error, when Redis stays
/// unreachable or the configuration cannot be used.
pub async fn connect(
    config: &RedisConfig,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Upstream, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.startup_timeout_secs);
    let where_ = config.describe();
    loop {
        let attempt = match config.mode {
            RedisMode::Standalone => standalone(config).await,
            RedisMode::Cluster => cluster(config).await,
            RedisMode::Sentinel => sentinel(config).await,
        };
        match attempt {
            Ok(upstream) => {
                if let Conn::Sentinel(primary) = &upstream.conn {
                    tracker.spawn(primary.clone().follow(shutdown));
                }
                return Ok(upstream);
            }
            Err(Fatal(e)) => return Err(format!("redis ({where_}): {e}")),
            Err(Retry(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "cannot reach Redis ({where_}) (gave up after {} s): {e}",
                    config.startup_timeout_secs
                ));
            }
            Err(Retry(e)) => {
                tracing::warn!(redis = %where_, error = %e, "Redis not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Why a connection attempt failed: a configuration that can never work, or something
/// that may pass.
enum Failure {
    Fatal(String),
    Retry(String),
}
use Failure::{Fatal, Retry};

async fn standalone(config: &RedisConfig) -> Result<Upstream, Failure> {
    let info = node_info(
        &config.url,
        &config.username,
        config.password.expose(),
        None,
    )
    .map_err(Fatal)?;
    let client = redis::Client::open(info).map_err(|e| Fatal(e.to_string()))?;
    let conn = ConnectionManager::new_with_config(client.clone(), manager_config(config))
        .await
        .map_err(|e| Retry(e.to_string()))?;
    Ok(Upstream {
        conn: Conn::Single(conn),
        bus: BusSource::Fixed(client),
    })
}

async fn cluster(config: &RedisConfig) -> Result<Upstream, Failure> {
    let (tx, pushes) = mpsc::unbounded_channel();
    let nodes = config
        .nodes
        .iter()
        .map(|url| node_info(url, "", "", None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal)?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(tx)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .response_timeout(Duration::from_millis(config.command_timeout_ms))
        .retries(3);
    if !config.username.is_empty() {
        builder = builder.username(&config.username);
    }
    if !config.password.is_empty() {
        builder = builder.password(config.password.expose());
    }
    let client = builder.build().map_err(|e| Fatal(e.to_string()))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| Retry(e.to_string()))?;
    Ok(Upstream {
        conn: Conn::Cluster(conn.clone()),
        bus: BusSource::Cluster { conn, pushes },
    })
}

async fn sentinel(config: &RedisConfig) -> Result<Upstream, Failure> {
    let primary = Arc::new(SentinelPrimary::new(config).map_err(Fatal)?);
    primary.resolve().await.map_err(Retry)?;
    Ok(Upstream {
        conn: Conn::Sentinel(primary.clone()),
        bus: BusSource::Sentinel(primary),
    })
}

/// The primary behind a set of Sentinels, followed through failovers.
pub struct SentinelPrimary {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<Option<Primary>>,
    /// Counts primary changes (0: none known yet); the bus resubscribes on a change.
    changes: watch::Sender<u64>,
    /// A command failed in a way that suggests a failover: ask the Sentinels now.
    suspect: Notify,
    manager_config: ConnectionManagerConfig,
    poll: Duration,
    /// Longest wait for one round of asking the Sentinels and checking the node.
    resolve_timeout: Duration,
    db: i64,
    master: String,
}

#[derive(Clone)]
struct Primary {
    addr: String,
    client: redis::Client,
    conn: ConnectionManager,
}

impl SentinelPrimary {
    fn new(config: &RedisConfig) -> Result<Self, String> {
        let sentinels = config
            .sentinels
            .iter()
            .map(|url| node_info(url, "", "", None).map(|info| info.addr().clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = SentinelClientBuilder::new(
            sentinels,
            &config.sentinel_master,
            SentinelServerType::Master,
        )
        .map_err(|e| e.to_string())?
        .set_client_to_redis_db(config.db);
        if !config.username.is_empty() {
            builder = builder.set_client_to_redis_username(&config.username);
        }
        if !config.password.is_empty() {
            builder = builder.set_client_to_redis_password(config.password.expose());
        }
        if !config.sentinel_username.is_empty() {
            builder = builder.set_client_to_sentinel_username(&config.sentinel_username);
        }
        if !config.sentinel_password.is_empty() {
            builder = builder.set_client_to_sentinel_password(config.sentinel_password.expose());
        }
        let sentinel = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
            current: RwLock::new(None),
            changes: watch::channel(0).0,
            suspect: Notify::new(),
            manager_config: manager_config(config),
            poll: Duration::from_millis(config.sentinel_poll_ms),
            resolve_timeout: Duration::from_millis(
                config.connect_timeout_ms + config.command_timeout_ms,
            ),
            db: config.db,
            master: config.sentinel_master.clone(),
        })
    }

    fn conn(&self) -> Option<ConnectionManager> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().map(|p| p.conn.clone())
    }

    /// A client for the current primary (the bus opens its pub/sub connection with it).
    pub fn client(&self) -> Option<redis::Client> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().map(|p| p.client.clone())
    }

    /// Changes whenever the primary does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A command failed: if the failure looks like a lost or demoted primary, ask the
    /// Sentinels now instead of at the next poll.
    fn suspect(&self, e: &RedisError) {
        let demoted = matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        );
        if demoted || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
            self.suspect.notify_one();
        }
    }

    /// Asks the Sentinels for the primary (the library also checks the node's `ROLE`)
    /// and, when it moved, connects to the new one and swaps it in.
    async fn resolve(&self) -> Result<(), String> {
        let client = {
            let mut sentinel = self.sentinel.lock().await;
            tokio::time::timeout(self.resolve_timeout, sentinel.async_get_client())
                .await
                .map_err(|_| "the Sentinels did not answer in time".to_string())?
                .map_err(|e| e.to_string())?
        };
        let addr = client.get_connection_info().addr().to_string();
        let unchanged = {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            current.as_ref().is_some_and(|p| p.addr == addr)
        };
        if unchanged {
            return Ok(());
        }
        let conn = tokio::time::timeout(
            self.resolve_timeout,
            ConnectionManager::new_with_config(client.clone(), self.manager_config.clone()),
        )
        .await
        .map_err(|_| format!("primary {addr} did not answer in time"))?
        .map_err(|e| format!("primary {addr}: {e}"))?;
        let previous = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Primary {
                addr: addr.clone(),
                client,
                conn,
            });
        match previous {
            Some(old) => tracing::warn!(master = %self.master, from = %old.addr, to = %addr,
                "Redis primary changed (Sentinel failover); commands and subscriptions move"),
            None => tracing::info!(master = %self.master, primary = %addr,
                "Redis primary found through Sentinel"),
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Follows the primary until shutdown: polls the Sentinels, and asks at once when a
    /// command failed.
    async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.poll) => {}
                () = self.suspect.notified() => {}
            }
            if let Err(e) = self.resolve().await {
                tracing::warn!(master = %self.master, error = %e,
                    "cannot determine the Redis primary through Sentinel");
            }
        }
    }
}
