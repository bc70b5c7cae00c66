//! `Application`: builds everything from a `Config`, owns the listener, runs until stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::bus::hub::Hub;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{BusTimeouts, RedisBus};
use crate::chat::{ChatLimits, ChatService};
use crate::config::Config;
use crate::limits::Limits;
use crate::limits::payload::PayloadBudget;
use crate::state::{AppState, Inner};
use crate::store::memory::MemoryStore;
use crate::store::redis::{Keys, RedisStore, WaitReplicas};
use crate::store::{Capacity, RateStore, Store, StoreSettings};
use crate::ws::gate::GateHandle;
use crate::ws::protocol::FrameCaps;
use crate::ws::session::SessionSettings;

/// Pending connections the kernel may queue before `accept` (capped by
/// `net.core.somaxconn`). The default of 128 overflows when thousands of clients reconnect
/// at once after a deploy.
const LISTEN_BACKLOG: u32 = 4096;

/// Longest wait for background tasks (bus subscriber, presence refresher) after sessions
/// have closed.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

/// The store, the bus, and (on Redis) where shared rate budgets live.
type Backends = (Arc<dyn Store>, Arc<dyn Bus>, Option<Arc<dyn RateStore>>);

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Redis(String),
    #[error("auth: {0}")]
    Auth(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: TcpListener,
    /// `/metrics` and `/healthz`, never exposed through the public port.
    admin: Option<TcpListener>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    state: AppState,
    /// Stops background tasks once sessions are gone.
    background: CancellationToken,
    background_tasks: TaskTracker,
    grace: Duration,
}

impl Application {
    /// Connects the store and bus, starts background tasks and binds the listener
    /// (port 0 picks a free port; see [`Application::port`]).
    ///
    /// # Errors
    /// Redis configured but unreachable within `redis.startup_timeout_secs`, or the
    /// address cannot be bound.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let replica = config.instance_id.clone();
        let hub = Arc::new(Hub::new(replica.clone()));
        let shutdown = CancellationToken::new();
        let background = CancellationToken::new();
        let background_tasks = TaskTracker::new();
        let sessions = TaskTracker::new();
        let settings = StoreSettings {
            history_max: config.store.history_max,
            history_max_bytes: config.store.channel_max_bytes,
            history_ttl_secs: config.store.history_ttl_secs,
            presence_ttl_ms: config.store.presence_ttl_secs * 1000,
            typing_ttl_secs: config.store.typing_ttl_secs,
        };

        let capacity = Arc::new(Capacity::default());
        let (store, bus, shared_rates): Backends = if config.uses_redis() {
            let upstream = crate::store::connection::connect(
                &config.redis,
                background.clone(),
                &background_tasks,
            )
            .await
            .map_err(StartupError::Redis)?;
            let keys = Keys::new(&config.redis.key_prefix, config.redis.tagged_keys());
            let bus = RedisBus::start(
                upstream.bus,
                keys.clone(),
                hub.clone(),
                BusTimeouts {
                    connect: Duration::from_millis(config.redis.connect_timeout_ms),
                    command: Duration::from_millis(config.redis.command_timeout_ms),
                },
                background.clone(),
                &background_tasks,
            );
            tracing::info!(redis = %config.redis.describe(), mode = config.redis.mode.as_str(),
                replica, "store and bus on Redis");
            let durable = upstream.durable.map(|conn| {
                let wait = WaitReplicas {
                    replicas: config.redis.wait_replicas,
                    timeout_ms: config.redis.wait_timeout_ms,
                };
                (conn, wait)
            });
            let sharded = config.redis.mode == crate::config::RedisMode::Cluster;
            let store = Arc::new(RedisStore::new(
                upstream.conn,
                keys,
                settings,
                sharded,
                durable,
            ));
            check_eviction(&store, &config).await?;
            background_tasks.spawn(store.clone().watch_capacity(
                capacity.clone(),
                config.redis.storage_full_ratio,
                Duration::from_millis(config.redis.memory_check_ms),
                background.clone(),
            ));
            (store.clone(), Arc::new(bus), Some(store))
        } else {
            let bus = Arc::new(MemoryBus::new(hub.clone()));
            tracing::info!(replica, "store and bus in memory (single process)");
            (Arc::new(MemoryStore::new(settings, bus.clone())), bus, None)
        };

        let limits = ChatLimits {
            history_default_limit: config.chat.history_default_limit,
            history_max_limit: config.chat.history_max_limit,
            history_max_bytes: config.chat.history_max_bytes,
            max_text_bytes: config.chat.max_text_bytes,
            media: config.media_limits(),
            outbound_queue: config.ws.outbound_queue,
            outbound_queue_bytes: config.ws.outbound_queue_bytes,
            presence_refresh: Duration::from_secs(config.store.presence_refresh_secs),
        };
        let budgets = Limits::new(&config.limits, shared_rates).map(Arc::new);
        match &budgets {
            Some(limits) => {
                background_tasks.spawn(limits.clone().keep_pruned(background.clone()));
            }
            None => tracing::warn!("limits.enabled = false: no rate or connection limits"),
        }
        let chat = Arc::new(ChatService::new(
            store,
            bus,
            hub,
            limits,
            budgets.clone(),
            capacity,
            sessions.clone(),
        ));
        let limits = budgets;
        let payloads = Arc::new(PayloadBudget::new(
            config.memory.large_payload_budget_bytes,
            config.ws.max_frame_bytes,
            Duration::from_millis(config.memory.large_payload_wait_ms),
        ));
        background_tasks.spawn(chat.clone().refresh_presence(background.clone()));

        let auth = if config.auth.enabled {
            let auth = crate::auth::Authenticator::start(
                &config.auth,
                background.clone(),
                &background_tasks,
            )
            .await
            .map_err(StartupError::Auth)?;
            Some(Arc::new(auth))
        } else {
            tracing::warn!("authentication is off: every caller is trusted to name itself");
            None
        };
        let origins = crate::http::origin::OriginPolicy::new(&config.cors, config.dev);

        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        let session = SessionSettings {
            ping_interval: Duration::from_secs(config.ws.ping_interval_secs),
            pong_timeout: Duration::from_secs(config.ws.pong_timeout_secs),
            write_timeout: Duration::from_secs(config.ws.write_timeout_secs),
            write_delay: Duration::from_millis(config.ws.write_delay_ms),
            drain_window: grace.mul_f64(0.8),
            limits: limits.clone(),
            client_ip: None,
            payloads: payloads.clone(),
            caps: FrameCaps {
                small: config.ws.max_frame_bytes,
            },
            gate: GateHandle::default(),
        };
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let listener = bind(&addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let metrics = crate::metrics::install();
        let admin = if config.admin.enabled {
            let addr = format!("{}:{}", config.admin.host, config.admin.port);
            match bind(&addr).await {
                Ok(listener) => Some(listener),
                // Trying chatgate out (or running two replicas on one machine) must not
                // fail on a port that something else, often Prometheus itself, holds.
                Err(e) if config.dev && e.kind() == std::io::ErrorKind::AddrInUse => {
                    let any = format!("{}:0", config.admin.host);
                    let listener = bind(&any)
                        .await
                        .map_err(|source| StartupError::Bind { addr: any, source })?;
                    tracing::warn!(
                        wanted = %addr,
                        bound = %listener.local_addr().map_err(|source| StartupError::Bind { addr: addr.clone(), source })?,
                        "admin port taken: dev mode listens on a free port instead (set CHATGATE_ADMIN__PORT to choose)"
                    );
                    Some(listener)
                }
                Err(source) => return Err(StartupError::Bind { addr, source }),
            }
        } else {
            None
        };
        let state = AppState::new(Inner {
            config: Arc::new(config),
            chat,
            shutdown,
            sessions,
            session,
            auth,
            origins,
            limits,
            payloads,
        });
        Ok(Self {
            listener,
            admin,
            metrics,
            state,
            background,
            background_tasks,
            grace,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The bound admin port, when the admin listener is on.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// Cancel it to start the drain (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// The application state (for tests and benchmarks that inspect the hub).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then drains: stops accepting, closes
    /// WebSocket sessions with 1001 spread over the drain window (each leaves presence),
    /// waits for them up to `server.shutdown_grace_secs`, then stops background tasks.
    ///
    /// # Errors
    /// The listener failed.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self {
            listener,
            admin,
            metrics,
            state,
            background,
            background_tasks,
            grace,
        } = self;
        let shutdown = state.shutdown.clone();
        let sessions = state.sessions.clone();
        let router = crate::http::middleware::apply(
            crate::http::router(state.clone()),
            &state.config,
            state.limits.clone(),
        );
        tracing::info!(addr = %listener.local_addr()?, "listening");
        background_tasks.spawn(metrics_upkeep(metrics.clone(), background.clone()));
        if let Some(admin) = admin {
            tracing::info!(addr = %admin.local_addr()?, "admin listening (/metrics)");
            let hub = state.chat.hub().clone();
            background_tasks.spawn(serve_admin(admin, metrics, hub, background.clone()));
        }
        // Connection caps and per-phase timeouts; in-flight requests finish on shutdown.
        let policy = crate::http::listener::ConnectionPolicy::new(&state.config);
        crate::http::listener::serve(listener, router, policy, shutdown.clone()).await;

        let open = state.chat.hub().session_count();
        tracing::info!(
            sessions = open,
            grace_secs = grace.as_secs(),
            "draining WebSocket sessions"
        );
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!(
                left = state.chat.hub().session_count(),
                "grace period over with sessions still open; exiting anyway"
            );
        }
        background.cancel();
        background_tasks.close();
        let _ = tokio::time::timeout(BACKGROUND_STOP, background_tasks.wait()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Seconds between two passes of the Prometheus recorder's upkeep (histogram buckets).
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Reads Redis's `maxmemory-policy` on every primary: a policy that can evict chatgate's
/// keys (rate budgets, presence, history) is a warning in dev mode and a startup error
/// otherwise, unless `redis.allow_evicting_policy` acknowledges it. A Redis that does not
/// answer `INFO memory` (a managed service may disable it) is a warning.
async fn check_eviction(store: &RedisStore, config: &Config) -> Result<(), StartupError> {
    let nodes = match store.memory().await {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::warn!(error = %e.0, "cannot read Redis's maxmemory-policy: make sure it is noeviction");
            return Ok(());
        }
    };
    if nodes.iter().all(|n| n.max == 0) {
        tracing::info!("Redis has no maxmemory: the storage_full guard is inactive");
    }
    let Some(evicting) = nodes.iter().find(|n| n.evicts()) else {
        return Ok(());
    };
    let policy = evicting.policy.as_str();
    if config.dev || config.redis.allow_evicting_policy {
        tracing::warn!(
            policy,
            "Redis's maxmemory-policy can evict chatgate's rate-limit, presence and history keys; \
             set it to noeviction"
        );
        return Ok(());
    }
    Err(StartupError::Redis(format!(
        "Redis's maxmemory-policy is {policy}: it can evict chatgate's rate-limit, presence and \
         history keys under memory pressure. Set maxmemory-policy noeviction, or acknowledge with \
         redis.allow_evicting_policy = true"
    )))
}

/// The admin listener: `GET /metrics` and `GET /healthz`, until `stop` (it outlives the
/// drain, so the drain itself can be watched).
async fn serve_admin(
    listener: TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    use axum::routing::get;
    let render = metrics.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                let stats = &hub.stats;
                crate::metrics::hub_totals(
                    stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
                    stats
                        .dropped_ephemeral
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
                crate::metrics::runtime_tasks(
                    tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks(),
                );
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let serve = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// The recorder's upkeep (it drains histogram samples into their buckets): without it,
/// samples pile up in memory, so it runs whether or not anything scrapes.
async fn metrics_upkeep(
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => metrics.run_upkeep(),
        }
    }
}

/// Binds with a deliberate backlog (see [`LISTEN_BACKLOG`]).
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("address resolved to nothing")))
}
