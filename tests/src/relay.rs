//! A UDP relay for edge tests: clients send to [`Relay::addr`], the relay forwards to the
//! broker from a socket of its own per client (so the broker sees one address per client,
//! bound to an IP of [`RelayConfig::upstream_ips`]) and sends the answers back. On the way it
//! drops and delays datagrams, both ways, by a seeded schedule ([`RelayConfig::seed`]), or
//! swallows every answer (`drop_replies`: a handshake that never completes).
//!
//! Every task it starts belongs to it and ends when it is dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Largest datagram relayed.
const DATAGRAM_BYTES_MAX: usize = 65_535;
/// Clients (source addresses) one relay serves at most; later ones are dropped.
pub const RELAY_CLIENTS_MAX: usize = 4096;

/// What the relay does to the datagrams it forwards.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Fixes the drop and delay schedule.
    pub seed: u64,
    /// Share of datagrams dropped in each direction, 0.0 to 1.0.
    pub loss: f64,
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more delay, drawn per datagram (so datagrams may be reordered).
    pub jitter: Duration,
    /// Swallow everything the broker sends: its handshakes never complete.
    pub drop_replies: bool,
    /// The IPs the relay's upstream sockets bind to, one per new client in turn.
    pub upstream_ips: Vec<IpAddr>,
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            seed: 0,
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            drop_replies: false,
            upstream_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }
}

/// Datagrams the relay forwarded and dropped, both directions together, and whether the
/// path is down (everything dropped).
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    down: AtomicBool,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    pub stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<()>,
}

/// SplitMix64: small, seeded, good enough for a fault schedule.
#[derive(Debug)]
struct Schedule {
    state: u64,
    loss: f64,
    delay: Duration,
    jitter: Duration,
}

impl Schedule {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `None` to drop the datagram, else how long to hold it.
    fn fate(&mut self) -> Option<Duration> {
        if self.loss > 0.0 && self.unit() < self.loss {
            return None;
        }
        let extra = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(self.unit())
        };
        Some(self.delay + extra)
    }
}

impl Relay {
    /// Listens on `listen` (port 0 for any) and relays to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: RelayConfig,
    ) -> std::io::Result<Relay> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let addr = socket.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let schedule = Arc::new(Mutex::new(Schedule {
            state: config.seed,
            loss: config.loss,
            delay: config.delay,
            jitter: config.jitter,
        }));
        let task = tokio::spawn(run(socket, upstream, config, schedule, stats.clone()));
        Ok(Relay { addr, stats, task })
    }

    pub fn forwarded(&self) -> u64 {
        self.stats.forwarded.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Takes the path down (every datagram dropped, both ways) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.stats.down.store(down, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The run task owns every other task (its `JoinSet`), so they end with it.
        self.task.abort();
    }
}

/// Sends `datagram` to `to` from `socket` after its fate (or drops it).
async fn forward(
    tasks: &mut JoinSet<()>,
    schedule: &Mutex<Schedule>,
    stats: &Arc<RelayStats>,
    socket: &Arc<UdpSocket>,
    datagram: Vec<u8>,
    to: SocketAddr,
) {
    let fate = schedule.lock().expect("schedule lock").fate();
    let Some(delay) = fate.filter(|_| !stats.down.load(Ordering::Relaxed)) else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if delay.is_zero() {
        let _ = socket.send_to(&datagram, to).await;
        return;
    }
    let socket = socket.clone();
    tasks.spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = socket.send_to(&datagram, to).await;
    });
}

async fn run(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    config: RelayConfig,
    schedule: Arc<Mutex<Schedule>>,
    stats: Arc<RelayStats>,
) {
    let mut tasks = JoinSet::new();
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        while tasks.try_join_next().is_some() {}
        let Ok((length, from)) = socket.recv_from(&mut buffer).await else {
            // An error report (ICMP) for an earlier datagram: not a reason to spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let upstream_socket = match clients.get(&from) {
            Some(upstream_socket) => upstream_socket.clone(),
            None if clients.len() >= RELAY_CLIENTS_MAX => continue,
            None => {
                let ip = config.upstream_ips[clients.len() % config.upstream_ips.len()];
                let Ok(bound) = UdpSocket::bind((ip, 0)).await else {
                    continue;
                };
                let bound = Arc::new(bound);
                clients.insert(from, bound.clone());
                tasks.spawn(answers(
                    bound.clone(),
                    socket.clone(),
                    from,
                    config.drop_replies,
                    schedule.clone(),
                    stats.clone(),
                ));
                bound
            }
        };
        forward(
            &mut tasks,
            &schedule,
            &stats,
            &upstream_socket,
            buffer[..length].to_vec(),
            upstream,
        )
        .await;
    }
}

/// Relays what the broker sends to one client's upstream socket back to the client.
async fn answers(
    upstream_socket: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    drop_replies: bool,
    schedule: Arc<Mutex<Schedule>>,
    stats: Arc<RelayStats>,
) {
    let mut tasks = JoinSet::new();
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        while tasks.try_join_next().is_some() {}
        let Ok(length) = upstream_socket.recv(&mut buffer).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        if drop_replies {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        forward(
            &mut tasks,
            &schedule,
            &stats,
            &socket,
            buffer[..length].to_vec(),
            client,
        )
        .await;
    }
}
