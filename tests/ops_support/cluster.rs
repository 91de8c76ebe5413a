//! A real Redis Cluster for the sharded Pub/Sub tests: `redis-server --cluster-enabled yes`
//! processes on free loopback ports (each stopped by PID), formed with `redis-cli --cluster
//! create`, and the operations a test does to it while fanout nodes are connected: move a slot
//! the way an operator does (IMPORTING / MIGRATING / MIGRATE / SETSLOT NODE), SIGKILL a master
//! and wait for its replica to take over, stop and restart the whole cluster on the same ports
//! and node files, add a shard. It speaks RESP through ops_support's [`RedisConn`].
//!
//! Every change the fixture makes (but [`RedisCluster::kill_master`] and
//! [`RedisCluster::stop_all`], which break it on purpose) ends in [`RedisCluster::wait_settled`]:
//! every running node says `cluster_state:ok`, all of them agree on who is master of which
//! slots and who replicates whom, none of them flags a running node as failing, the running
//! masters serve all 16384 slots and every running replica's link to its master is up. A test
//! can therefore use [`RedisCluster::master_of`] right after any of them. All waits give up
//! after [`PATIENCE`]; the fixture prints how long its start and changes took.
//!
//! The cluster bus port of each node is a second free port (`--cluster-port`): the default,
//! port + 10000, overflows for ports from the ephemeral range.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{fanout_client_lines, free_port, RedisConn, Reply, Server, Ws, PATIENCE};

/// `--cluster-node-timeout`: how long a silent node takes to be flagged as failing.
pub const NODE_TIMEOUT_MS: u64 = 2000;
/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// One redis-server of the cluster.
struct Node {
    port: u16,
    /// Cluster bus port (`--cluster-port`).
    bus: u16,
    child: Option<Child>,
}

/// What one node says about one cluster member (a line of `CLUSTER NODES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub port: u16,
    /// Flags other than `myself`: `master`, `slave`, `fail?`, `fail`, `handshake`, ...
    pub flags: Vec<String>,
    /// The master's node id for a replica.
    pub master_id: Option<String>,
    /// `connected` or `disconnected`: the cluster bus link as this node sees it.
    pub link: String,
    /// Slot ranges served (inclusive), without the importing/migrating markers.
    pub slots: Vec<(u16, u16)>,
}

impl Member {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Flagged as failing, not yet known, or without an address.
    pub fn unhealthy(&self) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
    }
}

/// The roles and slots the running nodes agree on, by port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Master port -> its slot ranges (masters without slots included).
    pub masters: BTreeMap<u16, Vec<(u16, u16)>>,
    /// Replica port -> its master's port.
    pub replicas: BTreeMap<u16, u16>,
}

impl Topology {
    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<u16> {
        self.masters
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|(&port, _)| port)
    }

    /// Masters that serve at least one slot, ordered by their first slot.
    pub fn serving_masters(&self) -> Vec<u16> {
        let mut m: Vec<(u16, u16)> = self
            .masters
            .iter()
            .filter_map(|(&port, r)| r.iter().map(|&(a, _)| a).min().map(|first| (first, port)))
            .collect();
        m.sort();
        m.into_iter().map(|(_, port)| port).collect()
    }

    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        self.replicas
            .iter()
            .filter(|(_, &m)| m == master)
            .map(|(&r, _)| r)
            .collect()
    }
}

/// Parses `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Result<Vec<Member>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return Err(format!("short CLUSTER NODES line {line:?}"));
        }
        // ip:port@cport[,hostname]
        let port = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no port in {line:?}"))?;
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue; // [slot->-id] / [slot-<-id]: a migration in progress on this node
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let parse = |x: &str| {
                x.parse::<u16>()
                    .map_err(|_| format!("bad slot {s:?} in {line:?}"))
            };
            slots.push((parse(a)?, parse(b)?));
        }
        out.push(Member {
            id: f[0].to_string(),
            port,
            flags: f[2]
                .split(',')
                .filter(|x| *x != "myself")
                .map(str::to_string)
                .collect(),
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            link: f[7].to_string(),
            slots,
        });
    }
    Ok(out)
}

/// Runs a command that must end by itself within [`PATIENCE`] and succeed; returns its output.
/// It is killed (by PID) if it does not end in time (`redis-cli --cluster create` waits for
/// the cluster to join without a limit).
fn run_bounded(cmd: &mut Command, what: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let mut pipes: Vec<Box<dyn Read + Send>> = vec![
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    let readers: Vec<_> = pipes
        .drain(..)
        .map(|mut p| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = p.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        })
        .collect();
    let status = super::wait_exit(&mut child, PATIENCE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output: String = readers
        .into_iter()
        .map(|r| r.join().unwrap_or_default())
        .collect();
    match status {
        Some(s) if s.success() => output,
        Some(s) => panic!("{what} failed ({s}):\n{output}"),
        None => panic!("{what} did not finish within {PATIENCE:?}:\n{output}"),
    }
}

/// One command on a new connection, errors returned (for polling nodes that may be down).
fn try_call(port: u16, args: &[&[u8]]) -> io::Result<Reply> {
    let mut c = RedisConn::try_open(port, None)?;
    c.send(args)?;
    c.read()
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// A Redis Cluster of `redis-server` processes on loopback; every process is killed (by PID)
/// and the node files removed when it is dropped.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Masters killed by [`RedisCluster::kill_master`] -> their replicas at the time.
    killed: BTreeMap<u16, Vec<u16>>,
    /// Channel names handed out by [`RedisCluster::channels_on_every_shard`].
    names: Cell<usize>,
    /// With TLS (`start_tls`): the certificate files, and each node's TLS port by its plain port
    /// (the plain port stays for the test's own commands and for `redis-cli --cluster`).
    tls: Option<ClusterTls>,
    tls_ports: BTreeMap<u16, u16>,
}

/// The files a TLS cluster's nodes serve and trust.
pub struct ClusterTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisCluster {
    /// Starts `masters` masters (at least 3, as `redis-cli --cluster create` requires) with
    /// `replicas_per_master` replicas each, and waits until the cluster is settled.
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas_per_master, None)
    }

    /// [`RedisCluster::start`] with TLS between clients and nodes and on the cluster bus
    /// (`--tls-port`, `--tls-cluster yes`); clients reach it with [`RedisCluster::tls_seeds`].
    pub fn start_tls(masters: usize, replicas_per_master: usize, tls: ClusterTls) -> RedisCluster {
        RedisCluster::start_with(masters, replicas_per_master, Some(tls))
    }

    fn start_with(
        masters: usize,
        replicas_per_master: usize,
        tls: Option<ClusterTls>,
    ) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "redis-cluster-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's temp dir");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
            killed: BTreeMap::new(),
            names: Cell::new(0),
            tls,
            tls_ports: BTreeMap::new(),
        };
        let started = Instant::now();
        for _ in 0..masters * (1 + replicas_per_master) {
            cluster.start_new_node();
        }
        cluster.form(masters, replicas_per_master);
        eprintln!(
            "redis cluster of {masters} masters x {replicas_per_master} replicas ready in {:?}",
            started.elapsed()
        );
        cluster
    }

    /// `masters` cluster-enabled redis-servers that do not form a cluster yet (no slot is
    /// served) until [`RedisCluster::form`]: what a node meets when it starts first.
    pub fn start_unformed(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let dir = std::env::temp_dir().join(format!(
            "redis-cluster-test-{}-unformed-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's temp dir");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
            killed: BTreeMap::new(),
            names: Cell::new(0),
            tls: None,
            tls_ports: BTreeMap::new(),
        };
        for _ in 0..masters {
            cluster.start_new_node();
        }
        cluster
    }

    /// Forms the cluster of the started nodes (`redis-cli --cluster create`) and waits until it
    /// is settled with `masters` masters of `replicas_per_master` replicas each.
    pub fn form(&mut self, masters: usize, replicas_per_master: usize) {
        let cluster = &*self;
        let mut create = Command::new("redis-cli");
        if let Some(tls) = &cluster.tls {
            // Nodes that talk TLS on the bus are introduced over their TLS ports.
            create.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            let port = cluster.tls_ports.get(&n.port).copied().unwrap_or(n.port);
            create.arg(format!("127.0.0.1:{port}"));
        }
        create
            .arg("--cluster-replicas")
            .arg(replicas_per_master.to_string())
            .arg("--cluster-yes");
        run_bounded(&mut create, "redis-cli --cluster create");
        let topo = cluster.wait_settled("the new cluster");
        assert_eq!(
            topo.serving_masters().len(),
            masters,
            "masters serving slots: {topo:?}"
        );
        for m in topo.serving_masters() {
            assert_eq!(
                topo.replicas_of(m).len(),
                replicas_per_master,
                "replicas of {m}: {topo:?}"
            );
        }
    }

    fn spawn(&self, port: u16, bus: u16) -> Child {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut command = Command::new("redis-server");
        if let (Some(tls), Some(tls_port)) = (&self.tls, self.tls_ports.get(&port)) {
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            command
                .args(["--tls-port", &tls_port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                .args(["--tls-cert-file", &path(&tls.cert)])
                .args(["--tls-key-file", &path(&tls.key)])
                .args(["--tls-ca-cert-file", &path(&tls.ca)]);
        }
        command
            .args(["--port", &port.to_string()])
            .args(["--cluster-port", &bus.to_string()])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("{dir}/nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            // A replica syncs at once instead of after the default 5 s batching delay.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--dir", &dir])
            .args(["--logfile", &format!("{dir}/redis-{port}.log")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (tests/setup installs it)")
    }

    /// Waits until the process answers PING; false if it exited first (its port was taken).
    fn wait_up(child: &mut Child, port: u16) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if matches!(try_call(port, &[b"PING"]), Ok(Reply::Simple(p)) if p == "PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {port} did not answer PING within {PATIENCE:?}");
    }

    /// Starts one more (empty) cluster node on new free ports; returns its port.
    fn start_new_node(&mut self) -> u16 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let port = free_port();
            let bus = free_port();
            let taken = self.nodes.iter().any(|n| [n.port, n.bus].contains(&port))
                || self.nodes.iter().any(|n| [n.port, n.bus].contains(&bus));
            if port != bus && !taken {
                if self.tls.is_some() {
                    self.tls_ports.insert(port, free_port());
                }
                let mut child = self.spawn(port, bus);
                if Self::wait_up(&mut child, port) {
                    self.nodes.push(Node {
                        port,
                        bus,
                        child: Some(child),
                    });
                    return port;
                }
                let _ = child.wait();
                let _ = std::fs::remove_file(self.dir.join(format!("nodes-{port}.conf")));
            }
            assert!(Instant::now() < deadline, "no free ports for redis-server");
        }
    }

    /// Ports of the nodes whose processes run.
    pub fn running(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    fn any_running(&self) -> u16 {
        *self.running().first().expect("no cluster node is running")
    }

    /// The redis-server PID on `port`, when running.
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.child.as_ref().map(Child::id))
    }

    /// `--redis-cluster` seeds: every node, masters first (`redis://127.0.0.1:P,127.0.0.1:Q,..`).
    /// The TLS port of the node on plain port `port` (a TLS cluster only).
    pub fn tls_port_of(&self, port: u16) -> Option<u16> {
        self.tls_ports.get(&port).copied()
    }

    /// `rediss://` seeds: the TLS ports of the nodes, masters first (a TLS cluster only).
    pub fn tls_seeds(&self) -> String {
        let list: Vec<String> = self
            .topology()
            .serving_masters()
            .iter()
            .filter_map(|p| self.tls_ports.get(p))
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("rediss://{}", list.join(","))
    }

    pub fn seeds(&self) -> String {
        let topo = self.topology();
        let masters = topo.serving_masters();
        let others = self
            .nodes
            .iter()
            .map(|n| n.port)
            .filter(|p| !masters.contains(p));
        let ports: Vec<u16> = masters.iter().copied().chain(others).collect();
        let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis://{}", list.join(","))
    }

    /// One command to the node on `port` (a new connection).
    pub fn call(&self, port: u16, args: &[&[u8]]) -> Reply {
        try_call(port, args).unwrap_or_else(|e| panic!("redis on {port}: {args:?}: {e}"))
    }

    /// One command whose reply is a string (`CLUSTER NODES`, `INFO`, `CLIENT LIST`).
    fn text(&self, port: u16, args: &[&str]) -> io::Result<String> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        match try_call(port, &args)? {
            r @ (Reply::Bulk(Some(_)) | Reply::Simple(_)) => Ok(r.text()),
            other => Err(io::Error::other(format!("{args:?} on {port}: {other:?}"))),
        }
    }

    /// `CLUSTER KEYSLOT name`, asked of Redis.
    pub fn keyslot(&self, name: &str) -> u16 {
        let slot = self
            .call(
                self.any_running(),
                &[b"CLUSTER", b"KEYSLOT", name.as_bytes()],
            )
            .int();
        u16::try_from(slot).expect("a slot fits 14 bits")
    }

    /// What a running node says the cluster is (roles and slots, by port).
    pub fn topology(&self) -> Topology {
        let port = self.any_running();
        let text = self
            .text(port, &["CLUSTER", "NODES"])
            .unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"));
        let members = parse_cluster_nodes(&text).unwrap_or_else(|e| panic!("{e}"));
        topology_of(&members)
    }

    /// The master serving the Redis channel (or key) `name`.
    pub fn master_of(&self, name: &str) -> u16 {
        let slot = self.keyslot(name);
        self.owner(slot)
    }

    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.topology()
            .owner(slot)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Masters serving slots, ordered by their first slot.
    pub fn masters(&self) -> Vec<u16> {
        self.topology().serving_masters()
    }

    /// Ports of running replicas.
    pub fn replicas(&self) -> Vec<u16> {
        self.topology().replicas.keys().copied().collect()
    }

    /// `SPUBLISH` on the channel's owner (following a `MOVED`); returns how many subscribers
    /// on that node received it.
    pub fn spublish(&self, channel: &str, payload: &[u8]) -> i64 {
        let mut port = self.master_of(channel);
        for _ in 0..5 {
            match self.call(port, &[b"SPUBLISH", channel.as_bytes(), payload]) {
                Reply::Int(n) => return n,
                Reply::Error(e) if e.starts_with("MOVED ") => {
                    port = e
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| panic!("unparsable {e:?}"));
                }
                other => panic!("SPUBLISH {channel} on {port}: {other:?}"),
            }
        }
        panic!("SPUBLISH {channel}: MOVED in circles");
    }

    /// `PUBSUB SHARDNUMSUB channel` on `port`.
    pub fn shardnumsub_on(&self, port: u16, channel: &str) -> i64 {
        self.call(port, &[b"PUBSUB", b"SHARDNUMSUB", channel.as_bytes()])
            .items()[1]
            .int()
    }

    /// `PUBSUB SHARDNUMSUB channel` on the channel's owner: how many connections (one per
    /// fanout node) subscribe to it there.
    pub fn shardnumsub(&self, channel: &str) -> i64 {
        self.shardnumsub_on(self.master_of(channel), channel)
    }

    /// Polls [`RedisCluster::shardnumsub`] until it is `want` (or PATIENCE); returns the last.
    pub fn wait_shardnumsub(&self, channel: &str, want: i64) -> i64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let n = self.shardnumsub(channel);
            if n == want || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CLIENT LIST` lines of connections named `fanout` on the node on `port`.
    pub fn fanout_links(&self, port: u16) -> Vec<String> {
        let list = self
            .text(port, &["CLIENT", "LIST"])
            .unwrap_or_else(|e| panic!("CLIENT LIST: {e}"));
        fanout_client_lines(&list)
    }

    /// Polls until every serving master has exactly `per_master` fanout links and every other
    /// running node none (or PATIENCE); returns the last counts by port.
    pub fn wait_fanout_links(&self, per_master: usize) -> BTreeMap<u16, usize> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let masters = self.masters();
            let counts: BTreeMap<u16, usize> = self
                .running()
                .into_iter()
                .map(|p| (p, self.fanout_links(p).len()))
                .collect();
            let good = counts
                .iter()
                .all(|(p, &n)| n == if masters.contains(p) { per_master } else { 0 });
            if good || Instant::now() >= deadline {
                return counts;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command that must answer `+OK`.
    fn ok(&self, port: u16, args: &[&str]) {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let reply = self.call(port, &bytes);
        assert_eq!(reply, Reply::Simple("OK".into()), "{args:?} on {port}");
    }

    fn myid(&self, port: u16) -> String {
        self.call(port, &[b"CLUSTER", b"MYID"]).text()
    }

    /// Moves `slot` to the master on `to` the way an operator does: IMPORTING on the target,
    /// MIGRATING on the source, MIGRATE of every key in the slot, SETSLOT NODE on the target,
    /// the source and every other master; then waits until the cluster is settled with the
    /// slot on `to`.
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot);
        if from == to {
            return;
        }
        let started = Instant::now();
        let (from_id, to_id) = (self.myid(from), self.myid(to));
        let s = slot.to_string();
        self.ok(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        self.ok(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        loop {
            let keys = self.call(from, &[b"CLUSTER", b"GETKEYSINSLOT", s.as_bytes(), b"100"]);
            let keys: Vec<String> = keys.items().iter().map(Reply::text).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            self.ok(from, &args);
        }
        // The new owner first, then the old one (which then pushes `sunsubscribe` to its
        // shard subscribers), then every other master.
        let others = self
            .masters()
            .into_iter()
            .filter(|m| ![to, from].contains(m));
        for port in [to, from].into_iter().chain(others) {
            self.ok(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
        let topo = self.wait_until(&format!("slot {slot} moved from {from} to {to}"), |t| {
            t.owner(slot) == Some(to)
        });
        assert_eq!(topo.owner(slot), Some(to));
        eprintln!(
            "slot {slot} moved from {from} to {to} in {:?}",
            started.elapsed()
        );
    }

    /// SIGKILLs the master on `port` (by PID), as a crash would. It must have replicas.
    pub fn kill_master(&mut self, port: u16) {
        let topo = self.topology();
        assert!(
            topo.serving_masters().contains(&port),
            "{port} is not a serving master: {topo:?}"
        );
        let replicas = topo.replicas_of(port);
        assert!(!replicas.is_empty(), "master {port} has no replica");
        self.kill(port);
        self.killed.insert(port, replicas);
    }

    fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on {port}"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until one of the replicas of the master killed on `old` serves its slots and the
    /// cluster is settled; returns the new master's port.
    pub fn wait_failover(&self, old: u16) -> u16 {
        let replicas = self
            .killed
            .get(&old)
            .unwrap_or_else(|| panic!("{old} was not killed by kill_master"))
            .clone();
        let started = Instant::now();
        let topo = self.wait_until(&format!("failover of {old}"), |t| {
            replicas
                .iter()
                .any(|r| t.masters.get(r).is_some_and(|s| !s.is_empty()))
        });
        let new = *replicas
            .iter()
            .find(|r| topo.masters.get(r).is_some_and(|s| !s.is_empty()))
            .unwrap();
        eprintln!(
            "replica {new} took over from {old} {:?} after the wait began",
            started.elapsed()
        );
        new
    }

    /// SIGKILLs every node (by PID); ports and node files are kept for
    /// [`RedisCluster::restart_all`].
    pub fn stop_all(&mut self) {
        for port in self.running() {
            self.kill(port);
        }
    }

    /// Starts every node that is not running again, on its ports with its node file, and waits
    /// until the cluster is settled. Roles may have changed: ask [`RedisCluster::master_of`].
    pub fn restart_all(&mut self) {
        let started = Instant::now();
        let stopped: Vec<(u16, u16)> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_none())
            .map(|n| (n.port, n.bus))
            .collect();
        let mut children: Vec<(u16, Child)> = stopped
            .iter()
            .map(|&(port, bus)| (port, self.spawn(port, bus)))
            .collect();
        let deadline = Instant::now() + PATIENCE;
        for (port, child) in children.iter_mut() {
            // Its port may have been taken meanwhile (briefly, we hope): retry on the same one.
            while !Self::wait_up(child, *port) {
                assert!(
                    Instant::now() < deadline,
                    "cannot restart redis-server on {port}"
                );
                std::thread::sleep(Duration::from_millis(100));
                let bus = stopped.iter().find(|(p, _)| p == port).unwrap().1;
                *child = self.spawn(*port, bus);
            }
        }
        for (port, child) in children {
            self.nodes
                .iter_mut()
                .find(|n| n.port == port)
                .unwrap()
                .child = Some(child);
        }
        self.killed.clear();
        self.wait_settled("the restarted cluster");
        eprintln!("redis cluster back in {:?}", started.elapsed());
    }

    /// Adds a master without replicas (`redis-cli --cluster add-node`) and moves `slots` to it
    /// with [`RedisCluster::migrate_slot`]; returns its port.
    pub fn add_shard(&mut self, slots: &[u16]) -> u16 {
        let started = Instant::now();
        let port = self.start_new_node();
        let existing = self.masters()[0];
        run_bounded(
            Command::new("redis-cli").args([
                "--cluster",
                "add-node",
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{existing}"),
            ]),
            "redis-cli --cluster add-node",
        );
        self.wait_until(&format!("node {port} joined"), |t| {
            t.masters.contains_key(&port)
        });
        for &slot in slots {
            self.migrate_slot(slot, port);
        }
        eprintln!(
            "shard {port} added with {} slot(s) in {:?}",
            slots.len(),
            started.elapsed()
        );
        port
    }

    /// `n` fanout channel names, new on every call, such that the Redis name `prefix + name`
    /// of name `i` is served by `masters()[i % masters]`: so `n >= masters` covers every shard.
    pub fn channels_on_every_shard(&self, prefix: &str, n: usize) -> Vec<String> {
        let topo = self.topology();
        let masters = topo.serving_masters();
        assert!(n >= masters.len(), "{n} channels cannot cover {masters:?}");
        let mut buckets: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        let per = n.div_ceil(masters.len());
        let mut conn = RedisConn::open(self.any_running(), None);
        let mut tries = 0;
        while masters
            .iter()
            .any(|m| buckets.get(m).map_or(0, Vec::len) < per)
        {
            tries += 1;
            assert!(tries < 100_000, "no names for every shard of {topo:?}");
            let k = self.names.get();
            self.names.set(k + 1);
            let name = format!("sh{k}");
            let full = format!("{prefix}{name}");
            let slot = conn.call(&[b"CLUSTER", b"KEYSLOT", full.as_bytes()]).int();
            let owner = topo.owner(slot as u16).expect("every slot is served");
            let bucket = buckets.entry(owner).or_default();
            if bucket.len() < per {
                bucket.push(name);
            }
        }
        (0..n)
            .map(|i| {
                buckets
                    .get_mut(&masters[i % masters.len()])
                    .unwrap()
                    .remove(0)
            })
            .collect()
    }

    /// Checks once whether the cluster is settled (see the module doc); Err says why not.
    pub fn settled(&self) -> Result<Topology, String> {
        let running = self.running();
        let mut agreed: Option<(u16, Topology)> = None;
        for &port in &running {
            let info = self
                .text(port, &["CLUSTER", "INFO"])
                .map_err(|e| format!("{port}: {e}"))?;
            if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                return Err(format!("{port}: not cluster_state:ok"));
            }
            let nodes = self
                .text(port, &["CLUSTER", "NODES"])
                .map_err(|e| format!("{port}: {e}"))?;
            let members = parse_cluster_nodes(&nodes)?;
            for &other in &running {
                let Some(m) = members.iter().find(|m| m.port == other) else {
                    return Err(format!("{port} does not know {other}"));
                };
                if m.unhealthy() || (other != port && m.link != "connected") {
                    return Err(format!("{port} sees {other} as {:?} {}", m.flags, m.link));
                }
            }
            // Only what it says of running nodes must agree (a killed one may be `fail` on
            // some and `fail?` on others for a while).
            let mut topo = topology_of(&members);
            topo.masters.retain(|p, _| running.contains(p));
            topo.replicas.retain(|p, _| running.contains(p));
            match &agreed {
                None => agreed = Some((port, topo)),
                Some((first, t)) if *t != topo => {
                    return Err(format!("{first} says {t:?} but {port} says {topo:?}"));
                }
                Some(_) => {}
            }
        }
        let (_, topo) = agreed.ok_or("no node is running")?;
        let served: u32 = topo
            .masters
            .values()
            .flatten()
            .map(|&(a, b)| u32::from(b - a) + 1)
            .sum();
        if served != u32::from(SLOTS) {
            return Err(format!("running masters serve {served} slots: {topo:?}"));
        }
        for (&replica, &master) in &topo.replicas {
            let info = self
                .text(replica, &["INFO", "replication"])
                .map_err(|e| format!("{replica}: {e}"))?;
            let link = info_field(&info, "master_link_status");
            let of = info_field(&info, "master_port");
            if link.as_deref() != Some("up") || of != Some(master.to_string()) {
                return Err(format!(
                    "replica {replica} of {master}: master_port {of:?}, link {link:?}"
                ));
            }
        }
        Ok(topo)
    }

    /// Waits until the cluster is settled; `what` names the wait on failure.
    pub fn wait_settled(&self, what: &str) -> Topology {
        self.wait_until(what, |_| true)
    }

    /// Waits until the cluster is settled and `cond` holds for it.
    fn wait_until(&self, what: &str, cond: impl Fn(&Topology) -> bool) -> Topology {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let why = match self.settled() {
                Ok(t) if cond(&t) => return t,
                Ok(t) => format!("settled, but not yet as wanted: {t:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not settled within {PATIENCE:?}: {why}\n{}",
                    self.log_tails(8)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of every node's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(self.dir.join(format!("redis-{}.log", n.port)))
                .unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- redis {} log tail:\n", n.port));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Starts `fanout --threads THREADS --redis-cluster SEEDS EXTRA` and waits until /readyz
    /// says 200.
    pub fn node(&self, threads: usize, extra: &[&str]) -> Server {
        let threads = threads.to_string();
        let seeds = self.seeds();
        let mut args = vec!["--threads", &threads, "--redis-cluster", &seeds];
        args.extend_from_slice(extra);
        Server::start_ready(&args)
    }

    /// [`super::probe_barrier`] with probes SPUBLISHed on the channel's owner.
    pub fn barrier(&self, redis_channel: &str, clients: &mut [&mut Ws]) -> Duration {
        super::probe_barrier(redis_channel, clients, |p| {
            self.spublish(redis_channel, p);
        })
    }
}

/// Roles and slots from one node's `CLUSTER NODES`, by port (failed nodes left out).
fn topology_of(members: &[Member]) -> Topology {
    let port_of: BTreeMap<&str, u16> = members.iter().map(|m| (m.id.as_str(), m.port)).collect();
    let mut topo = Topology {
        masters: BTreeMap::new(),
        replicas: BTreeMap::new(),
    };
    for m in members
        .iter()
        .filter(|m| !m.flags.iter().any(|f| f == "fail"))
    {
        if m.is_master() {
            topo.masters.insert(m.port, m.slots.clone());
        } else if let Some(master) = m.master_id.as_deref().and_then(|id| port_of.get(id)) {
            topo.replicas.insert(m.port, *master);
        }
    }
    topo
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in self.running() {
            self.kill(port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
