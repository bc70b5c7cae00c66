//! The cluster bus: sharded pub/sub on Redis Cluster.
//!
//! Each chat channel's events are published with `SPUBLISH` on `chat:{<ch>}:events`, which
//! lives in the channel's slot, so a message goes to the one shard that owns that slot
//! instead of being broadcast over the cluster bus to every node. This task subscribes
//! with `SSUBSCRIBE` on a cluster connection of its own, which routes each subscription
//! to the slot's owner; messages come back as RESP3 pushes.
//!
//! Like the standalone subscriber, it works in sessions: connect, subscribe every wanted
//! channel (each confirmed), serve; and on any sign of a lost subscription it drops the
//! connection, reconnects with backoff and subscribes everything again, then tells local
//! sessions to re-read what they may have missed (`events_missed`). Signs of loss: a
//! node connection dropped (the library's `Disconnection` push), the server
//! unsubscribed a channel we still want (Redis does that to every subscriber of a slot
//! that migrates to another node), or a primary did not answer the ping each second.
//! Starting over rather than patching one subscription keeps one rule: when the bus
//! says ready, every wanted channel was confirmed on the connection in use.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::redis::{Command, Exit, Links, Sessions};
use crate::store::connection::ClusterBus;

/// How often every primary is pinged.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct ClusterSubscriber {
    source: ClusterBus,
    links: Links,
    /// Chat channels subscribed (or to subscribe on reconnect).
    wanted: HashSet<String>,
    /// Sessions waiting for a confirmation while the connection is down.
    waiting: Vec<oneshot::Sender<()>>,
}

/// One connection's state.
struct Session {
    conn: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Our own unsubscribes whose confirmation push has not been seen yet.
    leaving: HashMap<String, usize>,
}

impl Sessions for ClusterSubscriber {
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

impl ClusterSubscriber {
    pub(super) fn new(source: ClusterBus, links: Links) -> Self {
        Self {
            source,
            links,
            wanted: HashSet::new(),
            waiting: Vec::new(),
        }
    }

    /// One connection's life: connect, subscribe everything wanted, then serve.
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        connected_before: &mut bool,
    ) -> Exit {
        let wait = self.links.timeouts.connect + self.links.timeouts.command;
        let (conn, pushes) = tokio::select! {
            () = shutdown.cancelled() => return Exit::Shutdown,
            r = timeout(wait, self.source.connect()) => match r {
                Ok(Ok(connected)) => connected,
                Ok(Err(e)) => return Exit::Lost(e.to_string()),
                Err(_) => return Exit::Lost("connect timed out".into()),
            },
        };
        let mut session = Session {
            conn,
            pushes,
            leaving: HashMap::new(),
        };
        if let Err(e) = ping_primaries(&mut session.conn, self.links.timeouts.command).await {
            return Exit::Lost(e);
        }
        let sink = &self.links.sink;
        self.wanted.retain(|ch| sink.has_members(ch));
        self.wanted.extend(sink.channels());
        let wanted: Vec<String> = self.wanted.iter().cloned().collect();
        for channel in wanted {
            if let Err(e) = self.ssubscribe(&mut session, &channel).await {
                return Exit::Lost(e);
            }
        }
        self.links
            .now_subscribed(self.wanted.len(), connected_before, &mut self.waiting);

        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Commands and the health check come before the pushes: under heavy traffic
            // pushes are always ready and would otherwise starve joins.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Exit::Shutdown,
                cmd = rx.recv() => match cmd {
                    None => return Exit::Shutdown,
                    Some(cmd) => if let Err(e) = self.command(&mut session, cmd).await {
                        return Exit::Lost(e);
                    },
                },
                _ = check.tick() => {
                    if let Err(e) = ping_primaries(&mut session.conn, self.links.timeouts.command).await {
                        return Exit::Lost(e);
                    }
                }
                push = session.pushes.recv() => match push {
                    None => return Exit::Lost("connection closed".into()),
                    Some(push) => if let Err(e) = self.push(&mut session, push) {
                        return Exit::Lost(e);
                    },
                },
            }
        }
    }

    async fn ssubscribe(&self, session: &mut Session, channel: &str) -> Result<(), String> {
        let name = self.links.keys.events(channel);
        match timeout(self.links.timeouts.command, session.conn.ssubscribe(&name)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("ssubscribe {channel}: {e}")),
            Err(_) => Err(format!("ssubscribe {channel}: timed out")),
        }
    }

    async fn command(&mut self, session: &mut Session, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Subscribe(channel, ack) => {
                if !self.wanted.contains(&channel) {
                    // Wanted from now on: a failure reconnects and subscribes it then.
                    self.wanted.insert(channel.clone());
                    if let Err(e) = self.ssubscribe(session, &channel).await {
                        self.waiting.push(ack);
                        return Err(e);
                    }
                }
                let _ = ack.send(());
            }
            Command::Release(channel) => {
                if self.links.sink.has_members(&channel) || !self.wanted.remove(&channel) {
                    return Ok(());
                }
                *session.leaving.entry(channel.clone()).or_default() += 1;
                let name = self.links.keys.events(&channel);
                match timeout(
                    self.links.timeouts.command,
                    session.conn.sunsubscribe(&name),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("sunsubscribe {channel}: {e}")),
                    Err(_) => return Err(format!("sunsubscribe {channel}: timed out")),
                }
            }
        }
        Ok(())
    }

    /// Handles one push; an error means a subscription was lost.
    fn push(&mut self, session: &mut Session, push: PushInfo) -> Result<(), String> {
        let channel_of = |data: &[Value]| match data.first() {
            Some(Value::BulkString(name)) => std::str::from_utf8(name)
                .ok()
                .and_then(|name| self.links.keys.channel_of_events(name))
                .map(str::to_string),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage => {
                if let (Some(channel), Some(Value::BulkString(payload))) =
                    (channel_of(&push.data), push.data.get(1))
                {
                    self.links.sink.deliver(&channel, payload);
                }
            }
            PushKind::SUnsubscribe => {
                let Some(channel) = channel_of(&push.data) else {
                    return Ok(());
                };
                if let Some(pending) = session.leaving.get_mut(&channel) {
                    // The confirmation of our own unsubscribe.
                    *pending -= 1;
                    if *pending == 0 {
                        session.leaving.remove(&channel);
                    }
                } else if self.wanted.contains(&channel) {
                    return Err(format!("the shard unsubscribed {channel} (its slot moved)"));
                }
            }
            PushKind::Disconnection => return Err("a node connection dropped".into()),
            _ => {}
        }
        Ok(())
    }
}

/// Pings every primary: the cluster answers as a whole.
async fn ping_primaries(conn: &mut ClusterConnection, wait: Duration) -> Result<(), String> {
    let ping = conn.route_command(
        redis::cmd("PING"),
        RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        )),
    );
    match timeout(wait, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("ping: {e}")),
        Err(_) => Err("ping: timed out".into()),
    }
}
