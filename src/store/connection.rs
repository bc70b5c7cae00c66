//! How chatgate reaches Redis in each `redis.mode` (see docs/redis.md):
//!
//! - **standalone**: one multiplexed [`ConnectionManager`] (reconnects by itself) for
//!   commands, and a plain client for the bus's pub/sub connection;
//! - **cluster**: a [`ClusterConnection`] that routes each command by its first key and
//!   follows `MOVED`/`ASK` and topology changes, and, for the bus, a separate RESP3
//!   cluster connection per bus session that carries only the sharded subscriptions
//!   (their messages come back as pushes). Separate, because Redis pushes an unrequested
//!   `sunsubscribe` when a slot migrates, and on a connection that also carried commands
//!   the client library could take it for the reply to an unrelated command;
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
    /// The current primary's command connection.
    Sentinel(Arc<SentinelPrimary>),
    /// The current primary's connection for appends that wait for replicas.
    SentinelDurable(Arc<SentinelPrimary>),
}

impl Conn {
    /// Tells a Sentinel connection to ask the Sentinels for the primary again (at most
    /// every 200 ms; nothing changes when it did not move). For failures whose cause a
    /// transaction hides: a write refused by a demoted primary inside `MULTI` comes back
    /// as `EXECABORT`, not as `READONLY`.
    pub fn recheck(&self) {
        if let Some((primary, _)) = self.sentinel() {
            primary.suspect.notify_one();
        }
    }

    /// The Sentinel primary behind this connection and which of its connections to use.
    fn sentinel(&self) -> Option<(Arc<SentinelPrimary>, bool)> {
        match self {
            Self::Sentinel(p) => Some((p.clone(), false)),
            Self::SentinelDurable(p) => Some((p.clone(), true)),
            Self::Single(_) | Self::Cluster(_) => None,
        }
    }
}

/// What the bus subscribes through.
pub enum BusSource {
    /// Standalone: a fixed server.
    Fixed(redis::Client),
    /// Sentinel: whichever node is the primary now.
    Sentinel(Arc<SentinelPrimary>),
    /// Cluster: a fresh subscription-only connection per bus session.
    Cluster(ClusterBus),
}

/// A connected Redis: the command connection, the connection for appends that wait for
/// replicas (`redis.wait_replicas`; `WAIT` blocks its connection, so it gets its own),
/// and the bus's source.
pub struct Upstream {
    pub conn: Conn,
    pub durable: Option<Conn>,
    pub bus: BusSource,
}

/// How to reach the cluster (the bus opens a connection per session).
pub struct ClusterBus {
    nodes: Vec<ConnectionInfo>,
    username: String,
    password: crate::config::Secret,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl ClusterBus {
    fn builder(&self) -> redis::cluster::ClusterClientBuilder {
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.command_timeout)
            .retries(3);
        if !self.username.is_empty() {
            builder = builder.username(&self.username);
        }
        if !self.password.is_empty() {
            builder = builder.password(self.password.expose());
        }
        builder
    }

    /// A new RESP3 cluster connection whose pushes (sharded messages, unsubscribe
    /// notices, `Disconnection` when a node's connection drops) arrive on the receiver;
    /// both end with the connection.
    pub async fn connect(
        &self,
    ) -> redis::RedisResult<(ClusterConnection, mpsc::UnboundedReceiver<PushInfo>)> {
        let (tx, pushes) = mpsc::unbounded_channel();
        let client = self
            .builder()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        Ok((client.get_async_connection().await?, pushes))
    }
}

fn no_primary() -> RedisError {
    RedisError::from((ErrorKind::Io, "no Redis primary known (Sentinel failover?)"))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(_) | Self::SentinelDurable(_) => Box::pin(async move {
                let (primary, durable) = self.sentinel().ok_or_else(no_primary)?;
                let mut conn = primary.conn(durable).ok_or_else(no_primary)?;
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
            // The whole pipeline goes on one connection to one primary.
            Self::Sentinel(_) | Self::SentinelDurable(_) => Box::pin(async move {
                let (primary, durable) = self.sentinel().ok_or_else(no_primary)?;
                let mut conn = primary.conn(durable).ok_or_else(no_primary)?;
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
            Self::Sentinel(primary) | Self::SentinelDurable(primary) => primary.db,
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
    let manager = || async {
        ConnectionManager::new_with_config(client.clone(), manager_config(config))
            .await
            .map_err(|e| Retry(e.to_string()))
    };
    let conn = manager().await?;
    let durable = match config.wait_replicas {
        0 => None,
        _ => Some(Conn::Single(manager().await?)),
    };
    Ok(Upstream {
        conn: Conn::Single(conn),
        durable,
        bus: BusSource::Fixed(client),
    })
}

async fn cluster(config: &RedisConfig) -> Result<Upstream, Failure> {
    let nodes = config
        .nodes
        .iter()
        .map(|url| node_info(url, "", "", None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal)?;
    let bus = ClusterBus {
        nodes,
        username: config.username.clone(),
        password: config.password.clone(),
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        command_timeout: Duration::from_millis(config.command_timeout_ms),
    };
    let client = bus.builder().build().map_err(|e| Fatal(e.to_string()))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| Retry(e.to_string()))?;
    Ok(Upstream {
        conn: Conn::Cluster(conn),
        durable: None,
        bus: BusSource::Cluster(bus),
    })
}

async fn sentinel(config: &RedisConfig) -> Result<Upstream, Failure> {
    let primary = Arc::new(SentinelPrimary::new(config).map_err(Fatal)?);
    primary.resolve().await.map_err(Retry)?;
    let durable = (config.wait_replicas > 0).then(|| Conn::SentinelDurable(primary.clone()));
    Ok(Upstream {
        conn: Conn::Sentinel(primary.clone()),
        durable,
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
    /// Also keep a connection for appends that wait for replicas.
    with_durable: bool,
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
    durable: Option<ConnectionManager>,
}

/// Shortest pause between two rounds of asking the Sentinels, so failing commands
/// during an outage do not turn into a stream of Sentinel queries.
const MIN_RESOLVE_GAP: Duration = Duration::from_millis(200);
/// The Sentinel client's own timeouts are fixed (1 s connect, 0.5 s reply per node):
/// one round may need a few of them when the first Sentinels are down.
const MIN_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

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
            with_durable: config.wait_replicas > 0,
            poll: Duration::from_millis(config.sentinel_poll_ms),
            resolve_timeout: Duration::from_millis(
                config.connect_timeout_ms + config.command_timeout_ms,
            )
            .max(MIN_RESOLVE_TIMEOUT),
            db: config.db,
            master: config.sentinel_master.clone(),
        })
    }

    fn conn(&self, durable: bool) -> Option<ConnectionManager> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let primary = current.as_ref()?;
        if durable {
            primary.durable.clone()
        } else {
            Some(primary.conn.clone())
        }
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
        let connect = || async {
            tokio::time::timeout(
                self.resolve_timeout,
                ConnectionManager::new_with_config(client.clone(), self.manager_config.clone()),
            )
            .await
            .map_err(|_| format!("primary {addr} did not answer in time"))?
            .map_err(|e| format!("primary {addr}: {e}"))
        };
        let conn = connect().await?;
        let durable = match self.with_durable {
            true => Some(connect().await?),
            false => None,
        };
        let previous = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Primary {
                addr: addr.clone(),
                client,
                conn,
                durable,
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
            tokio::time::sleep(MIN_RESOLVE_GAP).await;
        }
    }
}
