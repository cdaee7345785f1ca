//! A cluster of `ketch serve` processes on 127.0.0.1: UDP ports chosen up front (each broker's
//! `--listen` is also its address in every broker's `--peers`), a data directory per node, one
//! shared `--ca-dir`, and faults by PID — SIGKILL, SIGSTOP/SIGCONT, restart on the same port
//! and data. Finding leaders is the caller's business (it needs a client).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow, bail};

use crate::ketch::KetchProcess;

/// A node's id in its cluster (`--node-id`), 1-based.
pub type NodeId = u64;

/// The brokers of one cluster, node `i` at index `i - 1`.
#[derive(Debug)]
pub struct ClusterProcess {
    nodes: Vec<Node>,
    ca_dir: PathBuf,
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    listen: SocketAddr,
    data_dir: PathBuf,
    args: Vec<String>,
    /// A command the broker runs under (see [`KetchProcess::start_wrapped`]); empty: none.
    wrapper: Vec<String>,
    /// `None` while killed.
    process: Option<KetchProcess>,
}

impl Node {
    fn start(&self) -> anyhow::Result<KetchProcess> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        KetchProcess::start_wrapped(
            &self.data_dir,
            &self.listen.to_string(),
            &args,
            self.wrapper.clone(),
        )
    }
}

/// `count` distinct free UDP ports on 127.0.0.1: all bound at once (so distinct), then
/// released for the brokers — a small race with other programs that a retry of the test
/// would absorb.
pub fn free_udp_addrs(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let sockets: Vec<UdpSocket> = (0..count)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    sockets
        .iter()
        .map(|s| s.local_addr().map_err(Into::into))
        .collect()
}

impl ClusterProcess {
    /// Starts `nodes` brokers under `root` (`root/node-N`, `root/ca`), all at once: a broker
    /// may wait for a quorum before it says it is ready. `extra_args` go to every broker.
    pub fn start(root: &Path, nodes: usize, extra_args: &[&str]) -> anyhow::Result<ClusterProcess> {
        Self::start_wrapped(root, nodes, extra_args, &|_, _| Vec::new())
    }

    /// Like [`ClusterProcess::start`], each node run under `wrapper(id, data_dir)` (empty:
    /// none), e.g. one node's data on a small disk of its own ([`crate::disk::small_disk`]).
    pub fn start_wrapped(
        root: &Path,
        nodes: usize,
        extra_args: &[&str],
        wrapper: &dyn Fn(NodeId, &Path) -> Vec<String>,
    ) -> anyhow::Result<ClusterProcess> {
        if nodes == 0 {
            bail!("a cluster needs a node");
        }
        let addrs = free_udp_addrs(nodes)?;
        let ca_dir = root.join("ca");
        let peers: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("{}@{addr}", i + 1))
            .collect();
        let peers = peers.join(",");
        let mut cluster = ClusterProcess {
            nodes: Vec::new(),
            ca_dir: ca_dir.clone(),
        };
        for (i, listen) in addrs.into_iter().enumerate() {
            let id = i as NodeId + 1;
            let mut args = vec![
                "--node-id".to_owned(),
                id.to_string(),
                "--peers".to_owned(),
                peers.clone(),
                "--ca-dir".to_owned(),
                ca_dir.display().to_string(),
            ];
            args.extend(extra_args.iter().map(|a| a.to_string()));
            let data_dir = root.join(format!("node-{id}"));
            cluster.nodes.push(Node {
                id,
                listen,
                wrapper: wrapper(id, &data_dir),
                data_dir,
                args,
                process: None,
            });
        }
        cluster.start_stopped()?;
        Ok(cluster)
    }

    /// Starts every node that is not running, all at once.
    pub fn start_stopped(&mut self) -> anyhow::Result<()> {
        std::thread::scope(|scope| {
            let starts: Vec<_> = self
                .nodes
                .iter_mut()
                .filter(|node| node.process.is_none())
                .map(|node| {
                    scope.spawn(move || -> anyhow::Result<()> {
                        let process = node
                            .start()
                            .with_context(|| format!("starting node {}", node.id))?;
                        node.process = Some(process);
                        Ok(())
                    })
                })
                .collect();
            starts.into_iter().try_for_each(|start| {
                start
                    .join()
                    .map_err(|_| anyhow!("a start thread panicked"))?
            })
        })
    }

    /// Starts one more broker that is not in the initial membership: the next node id, a
    /// new port, the same `--peers` (the initial brokers) and `--ca-dir`, its data beside
    /// the others'. It joins once `ketch cluster add-broker ID@ADDR` registers it.
    pub fn start_joining(&mut self) -> anyhow::Result<NodeId> {
        let first = self.nodes.first().expect("a cluster has a node");
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let listen = free_udp_addrs(1)?[0];
        let root = first
            .data_dir
            .parent()
            .ok_or_else(|| anyhow!("node data directories have a parent"))?
            .to_path_buf();
        let mut args = first.args.clone();
        let at = args
            .iter()
            .position(|a| a == "--node-id")
            .ok_or_else(|| anyhow!("nodes are started with --node-id"))?;
        args[at + 1] = id.to_string();
        let mut node = Node {
            id,
            listen,
            data_dir: root.join(format!("node-{id}")),
            args,
            wrapper: Vec::new(),
            process: None,
        };
        node.process = Some(
            node.start()
                .with_context(|| format!("starting node {id}"))?,
        );
        self.nodes.push(node);
        Ok(id)
    }

    /// The node ids, in order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    /// The running broker of node `id`, if it runs (a paused one runs).
    pub fn broker(&self, id: NodeId) -> Option<&KetchProcess> {
        self.node(id).process.as_ref()
    }

    /// Node `id`'s address (clients and peers).
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        self.node(id).listen
    }

    /// Every node's address, for a client's bootstrap list (any broker of the cluster will
    /// do; dead ones are skipped by the client).
    pub fn bootstrap(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.listen.to_string()).collect()
    }

    /// The CA every broker's certificate is issued by: clients trust it.
    pub fn ca(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    /// The PID of node `id`, while it runs.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.broker(id).and_then(KetchProcess::pid)
    }

    /// SIGKILL to node `id` (no chance to sync or drain). Nothing if it is not running.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut process) = self.node_mut(id).process.take() {
            process.kill();
        }
    }

    /// SIGKILL to every node, one after another as fast as the harness can.
    pub fn kill_all(&mut self) {
        for id in self.node_ids() {
            self.kill(id);
        }
    }

    /// SIGSTOP to node `id`.
    pub fn pause(&self, id: NodeId) -> anyhow::Result<()> {
        self.running(id)?.pause()
    }

    /// SIGCONT to node `id`.
    pub fn resume(&self, id: NodeId) -> anyhow::Result<()> {
        self.running(id)?.resume()
    }

    /// Starts node `id` again on its port and data directory (killing it first if it runs).
    pub fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.kill(id);
        let node = self.node_mut(id);
        let process = node
            .start()
            .with_context(|| format!("restarting node {id}"))?;
        node.process = Some(process);
        Ok(())
    }

    fn running(&self, id: NodeId) -> anyhow::Result<&KetchProcess> {
        self.broker(id)
            .ok_or_else(|| anyhow!("node {id} is not running"))
    }

    /// Node `id`'s log (every life of it).
    pub fn log(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.node(id).data_dir.join("broker.log")).unwrap_or_default()
    }

    /// The last `lines` lines of every node's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let log = self.log(node.id);
            let all: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- node {} ({}) ---\n", node.id, node.listen));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// A `ketch` client command pointed at node `id` (running or not: commands to a dead
    /// broker are a test too).
    pub fn cli(&self, id: NodeId) -> Command {
        let mut command = Command::new(crate::ketch_bin());
        command
            .env("KETCH_BROKER", self.addr(id).to_string())
            .env("KETCH_CA_CERT", self.ca())
            .env("KETCH_LOG", "warn");
        command
    }
}

/// Brokers of one cluster, node ids `1..=size`; each is killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct KetchCluster {
    /// `brokers[i]` is node `i + 1`.
    pub brokers: Vec<KetchProcess>,
    /// The CA every broker's certificate comes from; clients trust it.
    pub ca: PathBuf,
    /// The `--peers` value every broker was started with.
    pub peers: String,
}

/// Free loopback UDP ports: all bound at once (so they differ), then released.
pub fn free_udp_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let sockets = (0..count)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding UDP sockets to pick ports")?;
    sockets.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

impl KetchCluster {
    /// Starts `size` brokers at once (they race to make the CA in `base/ca`), with
    /// `extra_args` each, and waits (bounded) for every ready line.
    pub fn start(base: &Path, size: usize, extra_args: &[&str]) -> anyhow::Result<KetchCluster> {
        let ports = free_udp_ports(size)?;
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let ca_dir = base.join("ca");
        let started: Vec<anyhow::Result<KetchProcess>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ports
                .iter()
                .enumerate()
                .map(|(i, port)| {
                    let node = (i + 1).to_string();
                    let listen = format!("127.0.0.1:{port}");
                    let data_dir = base.join(format!("node{node}"));
                    let ca_dir = ca_dir.to_string_lossy().into_owned();
                    let peers = peers.clone();
                    scope.spawn(move || {
                        let mut args =
                            vec!["--node-id", &node, "--peers", &peers, "--ca-dir", &ca_dir];
                        args.extend_from_slice(extra_args);
                        KetchProcess::start_at(&data_dir, &listen, &args)
                            .with_context(|| format!("starting node {node}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a start panicked")))
                })
                .collect()
        });
        let brokers = started.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        Ok(KetchCluster {
            brokers,
            ca: ca_dir.join("ca.pem"),
            peers,
        })
    }

    /// Node `id` (1-based).
    pub fn node(&mut self, id: u64) -> &mut KetchProcess {
        &mut self.brokers[id as usize - 1]
    }

    /// Every broker's `HOST:PORT`, for a client's bootstrap list.
    pub fn bootstrap(&self) -> Vec<String> {
        self.brokers.iter().map(KetchProcess::broker_arg).collect()
    }
}
