//! Real local Redis topologies for integration tests: a Redis Cluster of N primaries and
//! a Sentinel set (one primary, one replica, three Sentinels). Every process runs on free
//! ports with its own temporary directory, is killed (SIGKILL) on drop and its directory
//! removed; every wait is a bounded poll that panics with what it last saw.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::{FromRedisValue, Value};
use tokio::time::Instant;

use crate::helpers::free_port;

/// Longest wait for a topology to reach a state (start, convergence, failover).
const TOPOLOGY_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for one connection and command to one node.
const COMMAND_WAIT: Duration = Duration::from_secs(2);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(50);
/// Slots in a Redis Cluster.
const SLOTS: u32 = 16384;
/// The master name the Sentinels monitor.
const MASTER_NAME: &str = "mymaster";

/// A Redis Cluster of primaries only (no replicas), each node a private `redis-server`.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `primaries` (at least 3) nodes, creates the cluster with `redis-cli` and
    /// waits until every node reports `cluster_state:ok` and sees all 16384 slots served.
    pub async fn start(primaries: usize) -> Self {
        assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
        let ports = distinct_ports(primaries * 2);
        let mut cluster = Self { nodes: Vec::new() };
        for pair in ports.chunks(2) {
            let (port, bus_port) = (pair[0], pair[1]);
            let mut node = Node::new("cluster", port);
            let dir = node.dir_str();
            node.spawn(&[
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                // Its own free port: the default (port + 10000) may be taken or past 65535.
                "--cluster-port",
                &bus_port.to_string(),
                "--cluster-config-file",
                &format!("{dir}/nodes-{port}.conf"),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir,
                "--logfile",
                &format!("{dir}/redis.log"),
            ]);
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.wait_ping().await;
        }

        let addresses: Vec<String> = cluster
            .ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let output = tokio::time::timeout(
            TOPOLOGY_WAIT,
            tokio::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("redis-cli --cluster create finishes")
        .expect("redis-cli must be installed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );

        let ports = cluster.live_ports();
        poll("the cluster to converge", async || {
            for &port in &ports {
                let info: String = try_query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                if !info.contains("cluster_state:ok") {
                    return Err(format!("node {port}: not cluster_state:ok"));
                }
                let covered: u32 = slot_table(port)
                    .await?
                    .iter()
                    .map(|&(start, end, _)| u32::from(end - start) + 1)
                    .sum();
                if covered != SLOTS {
                    return Err(format!("node {port}: CLUSTER SLOTS covers {covered} slots"));
                }
            }
            Ok(())
        })
        .await;
        cluster
    }

    /// One `redis://127.0.0.1:P` URL per node, in start order.
    pub fn seed_urls(&self) -> Vec<String> {
        self.ports().iter().map(|port| url(*port)).collect()
    }

    /// Every node's port, in start order (killed ones included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// The port of the node serving `slot`, per the first live node's `CLUSTER SLOTS`.
    pub async fn node_port_for_slot(&self, slot: u16) -> u16 {
        let mut last = String::from("no live node");
        for port in self.live_ports() {
            match slot_table(port).await {
                Ok(table) => {
                    return table
                        .iter()
                        .find(|&&(start, end, _)| (start..=end).contains(&slot))
                        .map(|&(_, _, owner)| owner)
                        .unwrap_or_else(|| panic!("node {port}: no node serves slot {slot}"));
                }
                Err(err) => last = err,
            }
        }
        panic!("no node answered CLUSTER SLOTS: {last}");
    }

    /// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (what lies
    /// between the first `{` and the next `}`, if non-empty) or else the whole key, mod 16384.
    pub fn key_slot(key: &str) -> u16 {
        let key = key.as_bytes();
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let tag = &key[open + 1..];
                let close = tag.iter().position(|&b| b == b'}')?;
                (close > 0).then(|| &tag[..close])
            })
            .unwrap_or(key);
        (u32::from(crc16(hashed)) % SLOTS) as u16
    }

    /// Moves `slot` and its keys to the node on `to_port` the standard way (IMPORTING /
    /// MIGRATING, MIGRATE in batches, SETSLOT NODE everywhere), then waits until every
    /// live node's `CLUSTER SLOTS` shows the new owner.
    pub async fn migrate_slot(&self, slot: u16, to_port: u16) {
        assert!(
            self.live_ports().contains(&to_port),
            "no live node of this cluster on port {to_port}"
        );
        let from_port = self.node_port_for_slot(slot).await;
        if from_port == to_port {
            return;
        }
        let source_id: String = query(from_port, redis::cmd("CLUSTER").arg("MYID")).await;
        let target_id: String = query(to_port, redis::cmd("CLUSTER").arg("MYID")).await;
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        query::<()>(to_port, &setslot("IMPORTING", &source_id)).await;
        query::<()>(from_port, &setslot("MIGRATING", &target_id)).await;

        let deadline = Instant::now() + TOPOLOGY_WAIT;
        loop {
            let keys: Vec<Vec<u8>> = query(
                from_port,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )
            .await;
            if keys.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot}: keys still left on {from_port} after {TOPOLOGY_WAIT:?}"
            );
            query::<Value>(
                from_port,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to_port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            )
            .await;
        }

        let node = setslot("NODE", &target_id);
        query::<()>(to_port, &node).await;
        query::<()>(from_port, &node).await;
        let ports = self.live_ports();
        for &port in ports.iter().filter(|&&p| p != to_port && p != from_port) {
            query::<()>(port, &node).await;
        }
        poll(
            &format!("every node to see slot {slot} on {to_port}"),
            async || {
                for &port in &ports {
                    let owner = slot_table(port)
                        .await?
                        .iter()
                        .find(|&&(start, end, _)| (start..=end).contains(&slot))
                        .map(|&(_, _, owner)| owner);
                    if owner != Some(to_port) {
                        return Err(format!("node {port}: slot {slot} on {owner:?}"));
                    }
                }
                Ok(())
            },
        )
        .await;
    }

    /// Kills (SIGKILL) the node on `port`, as a crash.
    pub fn kill(&mut self, port: u16) {
        self.node(port).kill();
    }

    /// Starts the killed node on `port` again, with its arguments and its cluster
    /// configuration file (so it rejoins with its node id and slots; its data is gone,
    /// as nothing persists), and waits until the whole cluster is `cluster_state:ok`.
    pub async fn restart(&mut self, port: u16) {
        let node = self.node(port);
        assert!(node.child.is_none(), "node {port} is running");
        let args = node.args.clone();
        node.spawn(&args);
        node.wait_ping().await;
        let ports = self.live_ports();
        poll("the cluster to be whole again", async || {
            for &port in &ports {
                let info: String = try_query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                if !info.contains("cluster_state:ok") {
                    return Err(format!("node {port}: not cluster_state:ok"));
                }
            }
            Ok(())
        })
        .await;
    }

    fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }
}

/// One primary, two replicas and three Sentinels monitoring them as `mymaster`. Two
/// replicas, so that after a failover the new primary still has one (a client that
/// waits for a replica's confirmation keeps working).
pub struct SentinelSet {
    data: Vec<Node>,
    sentinels: Vec<Node>,
    primary: u16,
    replicas: Vec<u16>,
}

impl SentinelSet {
    /// Starts the primary and its replicas, waits until the replicas' links are up, then
    /// starts the Sentinels and waits until each one reports the primary and knows the
    /// replicas and the two other Sentinels (so a failover can happen).
    pub async fn start() -> Self {
        let ports = distinct_ports(6);
        let primary = ports[0];
        let replicas = ports[1..3].to_vec();
        let mut set = Self {
            data: Vec::new(),
            sentinels: Vec::new(),
            primary,
            replicas: replicas.clone(),
        };
        for &port in &ports[..3] {
            let mut node = Node::new("sentinel-data", port);
            let dir = node.dir_str();
            let mut args = vec![
                "--port".to_string(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                // Full syncs start at once (the default waits 5 s for more replicas).
                "--repl-diskless-sync-delay".into(),
                "0".into(),
                "--dir".into(),
                dir.clone(),
                "--logfile".into(),
                format!("{dir}/redis.log"),
            ];
            if port != primary {
                args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary.to_string(),
                ]);
            }
            node.spawn(&args);
            set.data.push(node);
        }
        for node in &mut set.data {
            node.wait_ping().await;
        }
        for &replica in &replicas {
            poll("the replica's link to the primary", async || {
                let info: String =
                    try_query(replica, redis::cmd("INFO").arg("replication")).await?;
                if info.contains("master_link_status:up") {
                    Ok(())
                } else {
                    Err(format!("replica {replica}: master link not up"))
                }
            })
            .await;
        }

        for &port in &ports[3..] {
            let mut node = Node::new("sentinel", port);
            let dir = node.dir_str();
            // Sentinel rewrites its configuration file: it lives in the node's own dir.
            let conf = format!("{dir}/sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\n\
                     bind 127.0.0.1\n\
                     logfile \"{dir}/sentinel.log\"\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 2000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n"
                ),
            )
            .unwrap();
            node.spawn(&[conf.as_str(), "--sentinel"]);
            set.sentinels.push(node);
        }
        for node in &mut set.sentinels {
            node.wait_ping().await;
        }
        let sentinel_ports: Vec<u16> = set.sentinels.iter().map(|node| node.port).collect();
        poll("every Sentinel to know the whole set", async || {
            for &port in &sentinel_ports {
                let reported = master_addr(port).await?;
                if reported != primary {
                    return Err(format!("sentinel {port}: primary is {reported}"));
                }
                let known = sentinel_entries(port, "REPLICAS").await?;
                let knows_replicas = replicas.iter().all(|replica| {
                    known.iter().any(|r| {
                        r.get("port") == Some(&replica.to_string())
                            && r.get("flags").map(String::as_str) == Some("slave")
                            && r.get("master-link-status").map(String::as_str) == Some("ok")
                    })
                });
                if !knows_replicas {
                    return Err(format!("sentinel {port}: replica not (yet) healthy"));
                }
                let peers = sentinel_entries(port, "SENTINELS")
                    .await?
                    .iter()
                    .filter(|s| s.get("flags").map(String::as_str) == Some("sentinel"))
                    .count();
                if peers != 2 {
                    return Err(format!("sentinel {port}: knows {peers} other Sentinels"));
                }
            }
            Ok(())
        })
        .await;
        set
    }

    /// The name the Sentinels monitor the primary under.
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// One `redis://127.0.0.1:P` URL per Sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|node| url(node.port)).collect()
    }

    /// The port of the primary, as last known (updated by [`Self::wait_failover`]).
    pub fn primary_port(&self) -> u16 {
        self.primary
    }

    /// The ports of the nodes started as replicas (after a failover, one of them is the
    /// primary).
    pub fn replica_ports(&self) -> &[u16] {
        &self.replicas
    }

    /// Kills (SIGKILL) the current primary, as a crash.
    pub fn kill_primary(&mut self) {
        let primary = self.primary;
        self.data
            .iter_mut()
            .find(|node| node.port == primary)
            .expect("the primary is one of the set's nodes")
            .kill();
    }

    /// Waits until every live Sentinel reports a primary other than the last known one
    /// and that node answers `ROLE` as master; returns its port and records it as the
    /// primary. Call after [`Self::kill_primary`].
    pub async fn wait_failover(&mut self) -> u16 {
        let old = self.primary;
        let sentinels: Vec<u16> = self
            .sentinels
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect();
        let new = poll(&format!("a failover away from {old}"), async || {
            let mut agreed = None;
            for &port in &sentinels {
                let reported = master_addr(port).await?;
                if reported == old || agreed.is_some_and(|a| a != reported) {
                    return Err(format!("sentinel {port}: primary is {reported}"));
                }
                agreed = Some(reported);
            }
            let new = agreed.ok_or("no live Sentinel")?;
            let role: Value = try_query(new, &redis::cmd("ROLE")).await?;
            match role {
                Value::Array(items) if items.first().is_some_and(is_master) => Ok(new),
                other => Err(format!("{new}: ROLE {other:?}")),
            }
        })
        .await;
        self.primary = new;
        new
    }
}

/// One `redis-server` process (data node or Sentinel) in its own temporary directory;
/// killed and its directory removed on drop.
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The arguments it was started with (a restart reuses them).
    args: Vec<std::ffi::OsString>,
}

impl Node {
    fn new(kind: &str, port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("chatgate-{kind}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            port,
            dir,
            child: None,
            args: Vec::new(),
        }
    }

    fn dir_str(&self) -> String {
        self.dir.to_str().unwrap().to_string()
    }

    fn spawn<S: AsRef<std::ffi::OsStr>>(&mut self, args: &[S]) {
        self.args = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let child = Command::new("redis-server")
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
    }

    /// Waits until the node answers PING; panics (with its log) if it exits first.
    async fn wait_ping(&mut self) {
        let deadline = Instant::now() + TOPOLOGY_WAIT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "redis-server on {} exited ({status}); log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if try_query::<String>(self.port, &redis::cmd("PING"))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not answer PING; log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of the node's log file.
    fn log(&self) -> String {
        let text = ["redis.log", "sentinel.log"]
            .iter()
            .find_map(|name| std::fs::read_to_string(self.dir.join(name)).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free ports.
fn distinct_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Polls `probe` until it succeeds; panics with its last error after [`TOPOLOGY_WAIT`].
async fn poll<T>(what: &str, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + TOPOLOGY_WAIT;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "waited {TOPOLOGY_WAIT:?} for {what}; last seen: {last}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A new connection to the node on `port`.
async fn connect(port: u16) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url(port)).map_err(|e| e.to_string())?;
    tokio::time::timeout(COMMAND_WAIT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("{port}: connect timed out"))?
        .map_err(|e| format!("{port}: {e}"))
}

/// `cmd` on a new connection to `port`; any failure (refused, timeout, error reply) as text.
async fn try_query<T: FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = connect(port).await?;
    tokio::time::timeout(COMMAND_WAIT, cmd.query_async(&mut conn))
        .await
        .map_err(|_| format!("{port}: {} timed out", describe(cmd)))?
        .map_err(|e| format!("{port}: {}: {e}", describe(cmd)))
}

/// `cmd` on `port`; panics if it fails.
async fn query<T: FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    try_query(port, cmd).await.unwrap_or_else(|e| panic!("{e}"))
}

/// The command's words, for messages.
fn describe(cmd: &redis::Cmd) -> String {
    cmd.args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            _ => "?".into(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `CLUSTER SLOTS` on `port` as (first slot, last slot, primary's port) ranges.
async fn slot_table(port: u16) -> Result<Vec<(u16, u16, u16)>, String> {
    let reply: Vec<Vec<Value>> = try_query(port, redis::cmd("CLUSTER").arg("SLOTS")).await?;
    reply
        .iter()
        .map(|range| {
            let field = |i: usize| range.get(i).ok_or(format!("CLUSTER SLOTS: {range:?}"));
            let number = |value: &Value| {
                redis::from_redis_value_ref::<u16>(value).map_err(|e| e.to_string())
            };
            let Value::Array(primary) = field(2)? else {
                return Err(format!("CLUSTER SLOTS: {range:?}"));
            };
            let owner = primary.get(1).ok_or(format!("CLUSTER SLOTS: {range:?}"))?;
            Ok((number(field(0)?)?, number(field(1)?)?, number(owner)?))
        })
        .collect()
}

/// The primary's port per the Sentinel on `port`.
async fn master_addr(port: u16) -> Result<u16, String> {
    let (_host, primary): (String, u16) = try_query(
        port,
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER_NAME),
    )
    .await?;
    Ok(primary)
}

/// `SENTINEL <what> mymaster` (REPLICAS or SENTINELS) as one field map per entry.
async fn sentinel_entries(port: u16, what: &str) -> Result<Vec<HashMap<String, String>>, String> {
    let entries: Vec<Vec<String>> =
        try_query(port, redis::cmd("SENTINEL").arg(what).arg(MASTER_NAME)).await?;
    Ok(entries
        .into_iter()
        .map(|flat| {
            flat.chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
                .collect()
        })
        .collect())
}

fn is_master(value: &Value) -> bool {
    redis::from_redis_value_ref::<String>(value).is_ok_and(|role| role == "master")
}

#[test]
fn key_slot_follows_the_cluster_spec() {
    // The XMODEM check value, and hash tags per the Redis Cluster specification.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(RedisCluster::key_slot("foo"), 12182);
    assert_eq!(
        RedisCluster::key_slot("{user1000}.following"),
        RedisCluster::key_slot("user1000")
    );
    assert_eq!(
        RedisCluster::key_slot("foo{}{bar}"),
        (u32::from(crc16(b"foo{}{bar}")) % SLOTS) as u16,
        "an empty tag hashes the whole key"
    );
    assert_eq!(
        RedisCluster::key_slot("foo{{bar}}zap"),
        RedisCluster::key_slot("{bar"),
        "the tag ends at the first `}}` after the first `{{`"
    );
}

#[tokio::test]
async fn cluster_harness_creates_a_cluster_and_moves_a_slot() {
    let started = std::time::Instant::now();
    let cluster = RedisCluster::start(3).await;
    assert_eq!(cluster.ports().len(), 3);
    assert_eq!(cluster.seed_urls().len(), 3);

    let mut seed = redis::Client::open(cluster.seed_urls()[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for key in [
        "chat:{general}:messages",
        "foo",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "chat:{x}:messages",
    ] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut seed)
            .await
            .unwrap();
        assert_eq!(RedisCluster::key_slot(key), slot, "slot of {key}");
    }

    let key = "chat:{x}:messages";
    let slot = RedisCluster::key_slot(key);
    let owner = cluster.node_port_for_slot(slot).await;
    query::<()>(owner, redis::cmd("SET").arg(key).arg("hello")).await;
    let target = *cluster.ports().iter().find(|&&p| p != owner).unwrap();
    cluster.migrate_slot(slot, target).await;

    assert_eq!(cluster.node_port_for_slot(slot).await, target);
    let value: String = query(target, redis::cmd("GET").arg(key)).await;
    assert_eq!(value, "hello");
    let moved = try_query::<String>(owner, redis::cmd("GET").arg(key)).await;
    assert!(
        moved
            .as_ref()
            .is_err_and(|e| e.contains(&format!("Moved: {slot} 127.0.0.1:{target}"))),
        "the old owner redirects: {moved:?}"
    );
    eprintln!("cluster harness test took {:?}", started.elapsed());
}

#[tokio::test]
async fn sentinel_harness_fails_over() {
    let started = std::time::Instant::now();
    let mut set = SentinelSet::start().await;
    let old = set.primary_port();
    query::<()>(old, redis::cmd("SET").arg("chat:k").arg("kept")).await;
    let replicated: i64 = query(old, redis::cmd("WAIT").arg(2).arg(5000)).await;
    assert_eq!(replicated, 2, "the write reached both replicas");

    set.kill_primary();
    let new = set.wait_failover().await;
    assert_ne!(new, old);
    assert!(set.replica_ports().contains(&new));
    assert_eq!(set.primary_port(), new);
    let value: String = query(new, redis::cmd("GET").arg("chat:k")).await;
    assert_eq!(value, "kept");

    // A client asking any Sentinel is now told the new primary.
    for sentinel in set.sentinel_urls() {
        let mut conn = redis::Client::open(sentinel)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(set.master_name())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(port, new);
    }
    eprintln!("sentinel harness test took {:?}", started.elapsed());
}
