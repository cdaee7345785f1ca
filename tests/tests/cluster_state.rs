//! What three cluster brokers share and report, with real broker processes on 127.0.0.1,
//! the `ketch` CLI and plain HTTP scrapes; every wait bounded.
//!
//! - Security (`--auth required`): tokens, ACLs, quotas and the owners of producer ids live
//!   in the metadata log, so a credential or rule made through any broker holds on every
//!   broker, and a revocation through one takes effect on all. Before, each broker kept its
//!   own: a token made through one broker was unknown to the others, and a client following
//!   a partition leader to another broker was refused.
//! - Replication gauges: partitions led and under-replicated partitions, per broker, each
//!   partition counted once across the cluster; a killed broker's partitions show up as
//!   under-replicated on the survivors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_e2e::cluster::TestCluster;
use ketch_testkit::cluster::NodeId;

/// How long a change made through one broker may take to reach another.
const PROPAGATION_MAX: Duration = Duration::from_secs(20);

/// Runs `ketch ARGS` against node `via` as `token`, with `stdin`; its stdout, or an error
/// with its stderr.
fn cli(
    cluster: &TestCluster,
    via: NodeId,
    token: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut command = cluster.process.cli(via);
    command
        .env("KETCH_TOKEN", token)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("running ketch")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "ketch {args:?} via node {via} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Retries `check` until it is true (bounded by [`PROPAGATION_MAX`]); the last error says why.
fn eventually(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("never checked");
    while started.elapsed() < PROPAGATION_MAX {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{what}: not within {PROPAGATION_MAX:?}; last: {last}")
}

#[test]
fn tokens_acls_and_producer_ids_hold_on_every_broker() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &["--auth", "required"])?;
    let node1 = cluster.process.broker(1).context("node 1 runs")?;
    let admin = std::fs::read_to_string(node1.data_dir.join("admin.token"))?
        .trim()
        .to_owned();

    // Node 1's admin token reaches the other brokers through the metadata log.
    for via in [2, 3] {
        eventually(&format!("node 1's admin token on node {via}"), || {
            cli(&cluster, via, &admin, &["topic", "list"], None).map(|_| true)
        })?;
    }

    // A topic whose leaders spread over the brokers; rules made through node 2, a token
    // made through node 3.
    cli(
        &cluster,
        2,
        &admin,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    )?;
    for operation in ["write", "read", "describe"] {
        cli(
            &cluster,
            2,
            &admin,
            &[
                "acl",
                "add",
                "--principal",
                "alice",
                "--allow",
                operation,
                "--topic",
                "orders",
            ],
            None,
        )?;
    }
    let created = cli(
        &cluster,
        3,
        &admin,
        &["token", "create", "--principal", "alice"],
        None,
    )?;
    let alice = created
        .split_whitespace()
        .last()
        .context("token create printed nothing")?
        .to_owned();

    for via in [1, 2, 3] {
        eventually(&format!("alice's token and rules on node {via}"), || {
            cli(
                &cluster,
                via,
                &alice,
                &["topic", "describe", "orders"],
                None,
            )
            .map(|_| true)
        })?;
    }
    // Alice's idempotent producer gets its id from node 1 and sends each partition's
    // batches to its leader, wherever it is: every broker knows the id is hers.
    const RECORDS: usize = 300;
    let lines: String = (0..RECORDS).map(|i| format!("k{i}:v{i}\n")).collect();
    cli(
        &cluster,
        1,
        &alice,
        &["produce", "orders", "--key-separator", ":"],
        Some(&lines),
    )?;
    let read = cli(
        &cluster,
        2,
        &alice,
        &[
            "consume",
            "orders",
            "--max-records",
            &RECORDS.to_string(),
            "--timeout-ms",
            "15000",
        ],
        None,
    )?;
    let mut values: Vec<&str> = read.lines().collect();
    values.sort_unstable();
    values.dedup();
    ensure!(
        values.len() == RECORDS,
        "alice read {} distinct of {RECORDS} records through node 2:\n{read}",
        values.len()
    );
    // What alice may not do, no broker lets her do.
    for via in [1, 2, 3] {
        ensure!(
            cli(
                &cluster,
                via,
                &alice,
                &["topic", "create", "mine", "--partitions", "1"],
                None
            )
            .is_err(),
            "node {via} let alice create a topic"
        );
    }

    // Revoked through node 1: refused through every broker.
    cli(&cluster, 1, &admin, &["token", "revoke", &alice], None)?;
    for via in [1, 2, 3] {
        eventually(&format!("the revocation on node {via}"), || {
            Ok(cli(&cluster, via, &alice, &["topic", "list"], None).is_err())
        })?;
    }
    let listed = cli(&cluster, 3, &admin, &["token", "list"], None)?;
    ensure!(listed.contains("alice"), "node 3's token list: {listed}");

    // A restarted broker keeps all of it (its files, then the metadata log replayed).
    cluster.process.restart(2)?;
    eventually("the admin token on restarted node 2", || {
        cli(&cluster, 2, &admin, &["topic", "list"], None).map(|_| true)
    })?;
    ensure!(
        cli(&cluster, 2, &alice, &["topic", "list"], None).is_err(),
        "restarted node 2 forgot the revocation"
    );
    let rules = cli(&cluster, 2, &admin, &["acl", "list"], None)?;
    ensure!(
        rules.matches("alice").count() >= 3,
        "restarted node 2's rules: {rules}"
    );
    Ok(())
}

/// The value of an unlabelled gauge in a broker's `/metrics` (absent: 0).
fn gauge(metrics: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&metrics, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").context("no header end")?.1;
    for line in body.lines() {
        if let Some(value) = line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
            return Ok(value.trim().parse()?);
        }
    }
    Ok(0.0)
}

/// Sums `name` over the running brokers.
fn cluster_sum(cluster: &TestCluster, name: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for id in cluster.process.node_ids() {
        if let Some(broker) = cluster.process.broker(id) {
            sum += gauge(broker.metrics.context("metrics endpoint")?, name)?;
        }
    }
    Ok(sum)
}

#[test]
fn partitions_led_and_under_replicated_partitions_add_up_across_brokers() -> anyhow::Result<()> {
    const PARTITIONS: u32 = 3;
    let mut cluster = TestCluster::start(3, &[])?;
    cluster.create_topic(1, "gauged", PARTITIONS, 3)?;
    eventually("every partition led once, none under-replicated", || {
        Ok(
            cluster_sum(&cluster, "ketch_partitions_led")? == f64::from(PARTITIONS)
                && cluster_sum(&cluster, "ketch_under_replicated_partitions")? == 0.0
                && cluster_sum(&cluster, "ketch_replicas")? == f64::from(3 * PARTITIONS),
        )
    })?;
    // Every partition has a replica on node 3: once its leaders notice, each partition is
    // led by a survivor and under-replicated.
    cluster.process.kill(3);
    eventually(
        "node 3's replicas missing from every partition's ISR",
        || {
            Ok(
                cluster_sum(&cluster, "ketch_partitions_led")? == f64::from(PARTITIONS)
                    && cluster_sum(&cluster, "ketch_under_replicated_partitions")?
                        == f64::from(PARTITIONS),
            )
        },
    )?;
    cluster.process.restart(3)?;
    eventually("node 3 back in sync", || {
        Ok(cluster_sum(&cluster, "ketch_under_replicated_partitions")? == 0.0)
    })?;
    Ok(())
}
