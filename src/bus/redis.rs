//! The Redis bus: one pub/sub connection per process (standalone and Sentinel mode; a
//! cluster's sharded subscriptions are in [`super::cluster`]).
//!
//! A single task owns the connection. In Sentinel mode it connects to the current
//! primary and moves (resubscribing everything) whenever the primary changes. Sessions ask it, through a queue, to subscribe to
//! their channel (and wait for the confirmation) and to release it when they leave; the
//! task keeps a subscription exactly while the hub has members for it. When the connection
//! drops (Redis restarted, network cut, a ping unanswered) the task reconnects with capped
//! exponential backoff and jitter and re-subscribes to every channel that still has local
//! members; until then [`Bus::is_ready`] is false and `/readyz` fails.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Bus, BusError, Deliver};
use crate::store::connection::{BusSource, SentinelPrimary};
use crate::store::redis::Keys;

/// How often the subscriber pings Redis to notice a dead connection that sent no RST.
const PING_EVERY: Duration = Duration::from_secs(5);
/// First and largest pause between reconnect attempts.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(super) enum Command {
    Subscribe(String, oneshot::Sender<()>),
    Release(String),
}

pub struct RedisBus {
    commands: mpsc::UnboundedSender<Command>,
    ready: Arc<AtomicBool>,
    /// Longest wait for a subscription confirmation.
    wait: Duration,
    /// Times the subscriber connection was re-established.
    pub reconnects: Arc<AtomicU64>,
}

/// Timing of the subscriber.
#[derive(Debug, Clone, Copy)]
pub struct BusTimeouts {
    pub connect: Duration,
    pub command: Duration,
}

impl RedisBus {
    /// Starts the subscriber task on `tracker`; it stops when `shutdown` is cancelled.
    pub fn start(
        source: BusSource,
        keys: Keys,
        sink: Arc<dyn Deliver>,
        timeouts: BusTimeouts,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let reconnects = Arc::new(AtomicU64::new(0));
        let links = Links {
            keys,
            sink,
            timeouts,
            ready: ready.clone(),
            reconnects: reconnects.clone(),
        };
        let target = match source {
            BusSource::Fixed(client) => Target::Fixed(client),
            BusSource::Sentinel(primary) => Target::Sentinel(primary),
            BusSource::Cluster(source) => {
                let subscriber = super::cluster::ClusterSubscriber::new(source, links);
                tracker.spawn(keep_connected(
                    subscriber,
                    rx,
                    shutdown,
                    "cluster bus lost its subscriptions",
                ));
                return Self {
                    commands,
                    ready,
                    wait: timeouts.connect + timeouts.command,
                    reconnects,
                };
            }
        };
        let subscriber = Subscriber {
            target,
            links,
            wanted: HashSet::new(),
            waiting: Vec::new(),
        };
        tracker.spawn(keep_connected(
            subscriber,
            rx,
            shutdown,
            "bus subscriber disconnected from Redis",
        ));
        Self {
            commands,
            ready,
            wait: timeouts.connect + timeouts.command,
            reconnects,
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn subscribe(&self, channel: &str) -> Result<(), BusError> {
        let (ack, done) = oneshot::channel();
        self.commands
            .send(Command::Subscribe(channel.to_string(), ack))
            .map_err(|_| BusError("subscriber stopped".into()))?;
        match timeout(self.wait, done).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(BusError("subscription failed".into())),
            Err(_) => Err(BusError("subscription not confirmed in time".into())),
        }
    }

    fn release(&self, channel: &str) {
        let _ = self.commands.send(Command::Release(channel.to_string()));
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Where the pub/sub connection goes.
enum Target {
    Fixed(redis::Client),
    Sentinel(Arc<SentinelPrimary>),
}

impl Target {
    fn client(&self) -> Option<redis::Client> {
        match self {
            Self::Fixed(client) => Some(client.clone()),
            Self::Sentinel(primary) => primary.client(),
        }
    }

    /// Changes when the connection must move (a new primary).
    fn moves(&self) -> Option<watch::Receiver<u64>> {
        match self {
            Self::Fixed(_) => None,
            Self::Sentinel(primary) => Some(primary.changes()),
        }
    }
}

/// Resolves when `moves` changes; never without one.
async fn moved(moves: &mut Option<watch::Receiver<u64>>) {
    match moves {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// What every subscriber task works with.
pub(super) struct Links {
    pub keys: Keys,
    pub sink: Arc<dyn Deliver>,
    pub timeouts: BusTimeouts,
    /// Whether events are flowing (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Times the subscriptions were re-established.
    pub reconnects: Arc<AtomicU64>,
}

impl Links {
    /// Every wanted channel is subscribed on a working connection: ready; after a
    /// reconnect, count it and tell sessions to re-read what they may have missed; and
    /// confirm the subscriptions that waited.
    pub(super) fn now_subscribed(
        &self,
        channels: usize,
        connected_before: &mut bool,
        waiting: &mut Vec<oneshot::Sender<()>>,
    ) {
        self.ready.store(true, Ordering::Release);
        if *connected_before {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            crate::metrics::pubsub_reconnected();
            self.sink.resync();
            tracing::info!(channels, "bus reconnected and resubscribed");
        }
        *connected_before = true;
        for ack in waiting.drain(..) {
            let _ = ack.send(());
        }
    }

    /// Waits out a reconnect pause of up to `backoff` (full jitter), still taking
    /// commands so callers are not stuck (they time out on their own if Redis stays
    /// away). False when the subscriber must stop.
    pub(super) async fn pause(
        &self,
        backoff: Duration,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        wanted: &mut HashSet<String>,
        waiting: &mut Vec<oneshot::Sender<()>>,
    ) -> bool {
        let sleep = tokio::time::sleep(backoff.mul_f64(fastrand::f64()));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = &mut sleep => return true,
                cmd = rx.recv() => match cmd {
                    Some(Command::Subscribe(channel, ack)) => {
                        wanted.insert(channel);
                        waiting.push(ack);
                    }
                    Some(Command::Release(channel)) => {
                        if !self.sink.has_members(&channel) {
                            wanted.remove(&channel);
                        }
                    }
                    None => return false,
                },
            }
        }
    }
}

struct Subscriber {
    target: Target,
    links: Links,
    /// Chat channels currently subscribed (or to subscribe on reconnect).
    wanted: HashSet<String>,
    /// Sessions waiting for a confirmation while the connection is down.
    waiting: Vec<oneshot::Sender<()>>,
}

/// How one connection's life ended.
pub(super) enum Exit {
    Shutdown,
    /// The connection (or a subscription on it) was lost: reconnect.
    Lost(String),
}

/// A subscriber task that lives in sessions, one per connection.
pub(super) trait Sessions: Send {
    /// One connection's life: connect, subscribe everything wanted, then serve.
    fn session(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        connected_before: &mut bool,
    ) -> impl std::future::Future<Output = Exit> + Send;

    /// The shared parts, the channels wanted and the subscriptions waiting.
    fn parts(&mut self) -> (&Links, &mut HashSet<String>, &mut Vec<oneshot::Sender<()>>);
}

/// Runs sessions until shutdown: after a lost connection, waits out a backoff pause
/// (capped exponential steps with full jitter, back to the shortest step after a
/// connection that worked) and starts the next session. `what` names the subscriber in
/// the warning.
pub(super) async fn keep_connected<S: Sessions>(
    mut subscriber: S,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
    what: &'static str,
) {
    let mut backoff = BACKOFF_MIN;
    let mut connected_before = false;
    loop {
        let exit = subscriber
            .session(&mut rx, &shutdown, &mut connected_before)
            .await;
        let (links, wanted, waiting) = subscriber.parts();
        if links.ready.swap(false, Ordering::AcqRel) {
            // This connection worked: the next outage starts from the shortest pause.
            backoff = BACKOFF_MIN;
        }
        match exit {
            Exit::Shutdown => return,
            Exit::Lost(why) => tracing::warn!(error = %why,
                retry_in_ms = backoff.as_millis() as u64, "{what}; reconnecting"),
        }
        if !links
            .pause(backoff, &mut rx, &shutdown, wanted, waiting)
            .await
        {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Sessions for Subscriber {
    fn session(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        connected_before: &mut bool,
    ) -> impl std::future::Future<Output = Exit> + Send {
        self.serve(rx, shutdown, connected_before)
    }

    fn parts(&mut self) -> (&Links, &mut HashSet<String>, &mut Vec<oneshot::Sender<()>>) {
        (&self.links, &mut self.wanted, &mut self.waiting)
    }
}

impl Subscriber {
    /// One connection's life: connect, subscribe everything wanted, then serve.
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        connected_before: &mut bool,
    ) -> Exit {
        let mut moves = self.target.moves();
        if let Some(rx) = &mut moves {
            rx.mark_unchanged();
        }
        let Some(client) = self.target.client() else {
            return Exit::Lost("no Redis primary known".into());
        };
        let connect = timeout(self.links.timeouts.connect, client.get_async_pubsub());
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => return Exit::Shutdown,
            r = connect => match r {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(e)) => return Exit::Lost(e.to_string()),
                Err(_) => return Exit::Lost("connect timed out".into()),
            },
        };
        let (mut sink, mut stream) = pubsub.split();

        // The hub is the truth for what is wanted; keep queued subscribes too.
        self.wanted.retain(|ch| self.links.sink.has_members(ch));
        let mut wanted: Vec<String> = self.wanted.iter().cloned().collect();
        wanted.extend(self.links.sink.channels());
        wanted.sort();
        wanted.dedup();
        if !wanted.is_empty() {
            let names: Vec<String> = wanted.iter().map(|c| self.links.keys.events(c)).collect();
            match timeout(self.links.timeouts.command, sink.subscribe(&names)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Exit::Lost(e.to_string()),
                Err(_) => return Exit::Lost("resubscribe timed out".into()),
            }
        }
        self.wanted = wanted.into_iter().collect();
        self.links
            .now_subscribed(self.wanted.len(), connected_before, &mut self.waiting);

        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            // Commands and the liveness ping come before the message stream: under heavy
            // traffic the stream is always ready and would otherwise starve joins.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Exit::Shutdown,
                () = moved(&mut moves) => {
                    return Exit::Lost("the Redis primary changed".into());
                }
                cmd = rx.recv() => match cmd {
                    None => return Exit::Shutdown,
                    Some(Command::Subscribe(channel, ack)) => {
                        if self.wanted.contains(&channel) {
                            let _ = ack.send(());
                            continue;
                        }
                        let name = self.links.keys.events(&channel);
                        match timeout(self.links.timeouts.command, sink.subscribe(&name)).await {
                            Ok(Ok(())) => {
                                self.wanted.insert(channel);
                                let _ = ack.send(());
                            }
                            failed => {
                                self.wanted.insert(channel);
                                self.waiting.push(ack);
                                return Exit::Lost(describe(failed));
                            }
                        }
                    }
                    Some(Command::Release(channel)) => {
                        if self.links.sink.has_members(&channel) || !self.wanted.remove(&channel) {
                            continue;
                        }
                        let name = self.links.keys.events(&channel);
                        if let failed @ (Ok(Err(_)) | Err(_)) =
                            timeout(self.links.timeouts.command, sink.unsubscribe(&name)).await
                        {
                            return Exit::Lost(describe(failed));
                        }
                    }
                },
                _ = ping.tick() => {
                    let pong = timeout(self.links.timeouts.command, sink.ping::<redis::Value>()).await;
                    if let failed @ (Ok(Err(_)) | Err(_)) = pong {
                        return Exit::Lost(describe(failed.map(|r| r.map(drop))));
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Exit::Lost("connection closed".into());
                    };
                    if let Some(channel) = self.links.keys.channel_of_events(msg.get_channel_name()) {
                        self.links.sink.deliver(channel, msg.get_payload_bytes());
                    }
                }
            }
        }
    }
}

fn describe(result: Result<redis::RedisResult<()>, tokio::time::error::Elapsed>) -> String {
    match result {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    }
}
