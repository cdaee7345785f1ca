//! A cluster of `ketch serve` processes on loopback: `--node-id N --listen 127.0.0.1:PORT
//! --peers 1@..,2@..,.. --data-dir BASE/nodeN --ca-dir BASE/ca`, as the CLI contract says.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::KetchProcess;

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
