//! The cluster bus: sharded pub/sub on Redis Cluster.
//!
//! Each chat channel's events are published with `SPUBLISH` on `chat:{<ch>}:events`, which
//! lives in the channel's slot, so a message goes to the one shard that owns that slot
//! instead of being broadcast over the cluster bus to every node. This task subscribes
//! with `SSUBSCRIBE` through the cluster connection, which routes each subscription to
//! the slot's owner and re-subscribes by itself after a node reconnects or the slot map
//! changes; messages come back as RESP3 pushes.
//!
//! On top of that the task:
//! - re-subscribes a channel that the server unsubscribed while it was still wanted
//!   (Redis does that to every subscriber of a slot that migrates to another node);
//! - pings every primary each second: `/readyz` reflects whether the whole cluster
//!   answers;
//! - after a node's connection dropped or a slot moved, tells local sessions to re-read
//!   what they may have missed (`events_missed`) once the cluster answers again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::redis::{Command, Links};

/// How often every primary is pinged.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct ClusterSubscriber {
    conn: ClusterConnection,
    links: Links,
    /// Chat channels subscribed.
    wanted: HashSet<String>,
    /// Wanted channels whose subscription was lost and is not back yet.
    orphaned: HashSet<String>,
    /// Events may have been lost since the last healthy check.
    lost: bool,
}

impl ClusterSubscriber {
    pub(super) fn new(conn: ClusterConnection, links: Links) -> Self {
        Self {
            conn,
            links,
            wanted: HashSet::new(),
            orphaned: HashSet::new(),
            lost: false,
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
        shutdown: CancellationToken,
    ) {
        // Ready (or not) before the first subscription is confirmed.
        self.check().await;
        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Commands and the health check come before the pushes: under heavy traffic
            // pushes are always ready and would otherwise starve joins.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(cmd) => self.command(cmd).await,
                },
                _ = check.tick() => self.check().await,
                push = pushes.recv() => match push {
                    None => return,
                    Some(push) => self.push(push),
                },
            }
        }
    }

    async fn ssubscribe(&mut self, channel: &str) -> Result<(), String> {
        let name = self.links.keys.events(channel);
        match timeout(self.links.timeouts.command, self.conn.ssubscribe(&name)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(channel, ack) => {
                if self.wanted.contains(&channel) && !self.orphaned.contains(&channel) {
                    let _ = ack.send(());
                    return;
                }
                match self.ssubscribe(&channel).await {
                    Ok(()) => {
                        self.orphaned.remove(&channel);
                        self.wanted.insert(channel);
                        let _ = ack.send(());
                    }
                    // Dropping the ack fails the caller's join; its client retries.
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "sharded subscribe failed");
                    }
                }
            }
            Command::Release(channel) => {
                if self.links.sink.has_members(&channel) || !self.wanted.remove(&channel) {
                    return;
                }
                self.orphaned.remove(&channel);
                let name = self.links.keys.events(&channel);
                if let Ok(Err(e)) | Err(e) =
                    timeout(self.links.timeouts.command, self.conn.sunsubscribe(&name))
                        .await
                        .map_err(|_| "timed out".to_string())
                        .map(|r| r.map_err(|e| e.to_string()))
                {
                    // The subscription may linger until that node reconnects; its events
                    // find no local member and are dropped.
                    tracing::debug!(channel, error = %e, "sharded unsubscribe failed");
                }
            }
        }
    }

    fn push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                if let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice()
                    && let Ok(name) = std::str::from_utf8(name)
                    && let Some(channel) = self.links.keys.channel_of_events(name)
                {
                    self.links.sink.deliver(channel, payload);
                }
            }
            PushKind::SUnsubscribe => {
                // Not ours (ours leave `wanted` first): the slot moved away from that node.
                if let Some(Value::BulkString(name)) = push.data.first()
                    && let Ok(name) = std::str::from_utf8(name)
                    && let Some(channel) = self.links.keys.channel_of_events(name)
                    && self.wanted.contains(channel)
                {
                    tracing::info!(channel, "shard unsubscribed us (slot moved); resubscribing");
                    self.orphaned.insert(channel.to_string());
                    self.lost = true;
                }
            }
            PushKind::Disconnection => {
                tracing::warn!("a Redis Cluster node connection dropped; reconnecting");
                self.lost = true;
                self.links.ready.store(false, Ordering::Release);
            }
            _ => {}
        }
    }

    /// Pings every primary; re-subscribes orphaned channels; once healthy after a loss,
    /// tells sessions to resync.
    async fn check(&mut self) {
        let ping = self.conn.route_command(
            redis::cmd("PING"),
            RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            )),
        );
        if let Err(e) = match timeout(self.links.timeouts.command, ping).await {
            Ok(r) => r.map(drop).map_err(|e| e.to_string()),
            Err(_) => Err("timed out".into()),
        } {
            if self.links.ready.swap(false, Ordering::AcqRel) {
                tracing::warn!(error = %e, "Redis Cluster not answering; bus not ready");
            }
            self.lost = true;
            return;
        }
        let orphaned: Vec<String> = self.orphaned.iter().cloned().collect();
        for channel in orphaned {
            if !self.links.sink.has_members(&channel) {
                self.orphaned.remove(&channel);
                self.wanted.remove(&channel);
                continue;
            }
            match self.ssubscribe(&channel).await {
                Ok(()) => {
                    self.orphaned.remove(&channel);
                }
                Err(e) => {
                    tracing::warn!(channel, error = %e, "resubscribe failed; retrying");
                    self.links.ready.store(false, Ordering::Release);
                    return;
                }
            }
        }
        self.links.ready.store(true, Ordering::Release);
        if std::mem::take(&mut self.lost) {
            self.links.reconnects.fetch_add(1, Ordering::Relaxed);
            crate::metrics::pubsub_reconnected();
            self.links.sink.resync();
            tracing::info!(
                channels = self.wanted.len(),
                "Redis Cluster answers again; sessions told to resync"
            );
        }
    }
}
