//! The client subcommands of `ketch`: topic, produce, consume, group. Thin over
//! `ketch-client`; output is for people and for scripts (one line per item).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use ketch_client::{
    Acks, AutoOffsetReset, Client, ClientCertificate, ClientConfig, ConsumerConfig, ConsumerRecord,
    NewTopic, Offset, ProducerConfig, ProducerRecord, Tls, TopicPartition,
};

/// Where the broker is and how to trust it (flags of the client commands only).
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// Broker address (UDP, HOST:PORT).
    #[arg(
        long,
        global = true,
        env = "KETCH_BROKER",
        default_value = "127.0.0.1:9192"
    )]
    broker: String,
    /// CA certificate (PEM) to verify the broker with; defaults to ./ketch-data/ca.pem when
    /// it exists (the development CA of a local `ketch serve`).
    #[arg(long, global = true, env = "KETCH_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// TLS server name to verify in the broker's certificate.
    #[arg(
        long,
        global = true,
        env = "KETCH_SERVER_NAME",
        default_value = "localhost"
    )]
    server_name: String,
    /// API token to authenticate with (`ketch token create`).
    #[arg(long, global = true, env = "KETCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client certificate (PEM chain) for mutual TLS; goes with --client-key.
    #[arg(
        long,
        global = true,
        env = "KETCH_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        env = "KETCH_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl Connection {
    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let ca = match &self.ca_cert {
            Some(path) => path.clone(),
            None => {
                let local = PathBuf::from("ketch-data/ca.pem");
                if !local.exists() {
                    bail!(
                        "no CA certificate: pass --ca-cert or set KETCH_CA_CERT (a local `ketch serve` writes ./ketch-data/ca.pem)"
                    );
                }
                local
            }
        };
        Ok(ClientConfig {
            bootstrap: vec![self.broker.clone()],
            server_name: self.server_name.clone(),
            tls: Tls::CaFile(ca),
            client_id: "ketch-cli".into(),
            bearer_token: self.token.clone().filter(|t| !t.is_empty()),
            client_certificate: match (&self.client_cert, &self.client_key) {
                (Some(certificate_chain), Some(private_key)) => Some(ClientCertificate::Files {
                    certificate_chain: certificate_chain.clone(),
                    private_key: private_key.clone(),
                }),
                _ => None,
            },
            ..ClientConfig::default()
        })
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.client_config()?;
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to {}", self.broker))
    }
}

/// `ketch topic ...`: the connection flags apply to every topic subcommand.
#[derive(Debug, Args)]
pub struct TopicArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TopicCommand,
}

/// `ketch group ...`.
#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Copies of each partition, on as many brokers (a cluster's `--peers`).
        #[arg(long, default_value_t = 1)]
        replication_factor: u16,
        /// Delete records older than this, in milliseconds; -1 keeps them forever.
        /// [default: the broker's --retention-ms]
        #[arg(long)]
        retention_ms: Option<i64>,
        /// Keep at most this many bytes per partition; -1 for no limit.
        /// [default: the broker's --retention-bytes]
        #[arg(long)]
        retention_bytes: Option<i64>,
        /// delete (retention removes old segments), compact (keep the latest record per
        /// key), or compact,delete. [default: delete]
        #[arg(long, value_name = "POLICY")]
        cleanup_policy: Option<String>,
        /// Any topic setting, Kafka's names (retention.ms, retention.bytes, cleanup.policy,
        /// delete.retention.ms); repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_entry)]
        configs: Vec<(String, String)>,
    },
    /// Change settings of a topic: all given, or none if one is invalid.
    Alter {
        name: String,
        /// delete, compact, or compact,delete.
        #[arg(long, value_name = "POLICY")]
        cleanup_policy: Option<String>,
        /// A topic setting, Kafka's names (retention.ms, retention.bytes, cleanup.policy,
        /// delete.retention.ms); repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_entry)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show a topic's partitions, offsets and configuration.
    Describe { name: String },
    /// Delete a topic and its records.
    Delete { name: String },
    /// Set the Wasm filters every batch produced to TOPIC runs through before it is stored
    /// (each pinned at its latest version), or clear them with --none.
    SetFilters {
        topic: String,
        /// Deployed filters, comma-separated, in the order they run.
        #[arg(
            value_name = "NAME[,NAME...]",
            value_delimiter = ',',
            required_unless_present = "none",
            conflicts_with = "none"
        )]
        filters: Vec<String>,
        /// JSON text every filter of the chain gets at init.
        #[arg(long, default_value = "")]
        params: String,
        /// What a record error does: fail (the produce fails), skip (the record is dropped) or
        /// dead-letter:TOPIC (the record goes to TOPIC).
        #[arg(
            long,
            default_value = "fail",
            value_name = "fail|skip|dead-letter:TOPIC"
        )]
        on_error: ketch_client::OnRecordError,
        /// Remove the topic's filters.
        #[arg(long)]
        none: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List,
    /// Show a group's members, partitions, committed offsets and lag.
    Describe { group: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AcksArg {
    None,
    Leader,
    All,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    topic: String,
    /// Split each line at the first SEP: the part before is the key. [default: no key]
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Write every record to this partition. [default: by key hash; records without a key
    /// stick to one partition per batch, as Kafka's default partitioner does (KIP-794)]
    #[arg(long)]
    partition: Option<u32>,
    /// Acknowledgement to wait for: none, leader (the leader's append) or all (every in-sync
    /// replica, durable per the broker's fsync policy).
    #[arg(long, value_enum, default_value = "all")]
    acks: AcksArg,
    /// How long a batch waits for more records, in milliseconds.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    topic: String,
    /// Consume as a member of this group (committing offsets on exit). [default: no group:
    /// read every partition]
    #[arg(long)]
    group: Option<String>,
    /// beginning | end | OFFSET | @TIMESTAMP_MS. With --group, where to start on partitions
    /// without a committed offset (beginning or end).
    #[arg(long, default_value = "beginning")]
    from: String,
    /// Read only this partition. [default: all partitions]
    #[arg(long)]
    partition: Option<u32>,
    /// Exit after this many records. [default: no limit]
    #[arg(long)]
    max_records: Option<u64>,
    /// Exit after this long without a new record, in milliseconds. [default: wait until
    /// Ctrl-C]
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Output per record: %t topic, %p partition, %o offset, %k key, %v value, %T timestamp,
    /// %% a percent sign, \n and \t.
    #[arg(long, default_value = "%v")]
    format: String,
    #[command(flatten)]
    connection: Connection,
    /// Read through this Wasm filter (deployed with `ketch filter deploy`): the broker runs
    /// it and sends only what it keeps, at the source offsets.
    #[arg(long)]
    filter: Option<String>,
    /// JSON params handed to the filter's init.
    #[arg(long, requires = "filter")]
    filter_params: Option<String>,
}

pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting the async runtime")
        .block_on(future)
}

/// `KEY=VALUE` of `--config`.
fn parse_config_entry(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

pub fn topic(args: TopicArgs) -> anyhow::Result<()> {
    let TopicArgs {
        connection,
        command,
    } = args;
    block_on(async {
        let client = connection.connect().await?;
        let admin = client.admin();
        let mut out = std::io::stdout().lock();
        match command {
            TopicCommand::Create {
                name,
                partitions,
                replication_factor,
                retention_ms,
                retention_bytes,
                cleanup_policy,
                configs,
            } => {
                let mut topic = NewTopic::new(&name, partitions);
                topic.replication_factor = replication_factor;
                if let Some(ms) = retention_ms {
                    topic.configs.push(("retention.ms".into(), ms.to_string()));
                }
                if let Some(bytes) = retention_bytes {
                    topic
                        .configs
                        .push(("retention.bytes".into(), bytes.to_string()));
                }
                if let Some(policy) = cleanup_policy {
                    topic.configs.push(("cleanup.policy".into(), policy));
                }
                topic.configs.extend(configs);
                admin.create_topic(topic).await?;
                writeln!(out, "created topic {name} with {partitions} partitions")?;
            }
            TopicCommand::Alter {
                name,
                cleanup_policy,
                mut configs,
            } => {
                if let Some(policy) = cleanup_policy {
                    configs.push(("cleanup.policy".into(), policy));
                }
                anyhow::ensure!(
                    !configs.is_empty(),
                    "nothing to change: give --cleanup-policy or --config KEY=VALUE"
                );
                let now = admin.alter_topic_config(&name, configs).await?;
                writeln!(out, "altered topic {name}")?;
                for (key, value) in &now {
                    writeln!(out, "  {key}={value}")?;
                }
            }
            TopicCommand::List => {
                for topic in admin.list_topics().await? {
                    writeln!(
                        out,
                        "{}\tpartitions={}\treplicas={}",
                        topic.name, topic.partitions, topic.replication_factor
                    )?;
                }
            }
            TopicCommand::Describe { name } => {
                let topic = admin.describe_topic(&name).await?;
                writeln!(out, "topic {}", topic.name)?;
                for (key, value) in &topic.configs {
                    writeln!(out, "  {key}={value}")?;
                }
                let chain = admin.topic_filters(&name).await?;
                if !chain.filters.is_empty() {
                    writeln!(
                        out,
                        "  produce filters: {} (on-error {}, params {:?})",
                        chain_text(&chain.filters),
                        chain.on_error,
                        chain.params
                    )?;
                }
                writeln!(
                    out,
                    "PARTITION\tLEADER\tLOG-START\tHIGH-WATERMARK\tEPOCH\tREPLICAS\tISR"
                )?;
                let ids =
                    |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                for p in &topic.partitions {
                    let leader = p.leader.map_or("-".to_owned(), |l| l.to_string());
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        p.partition,
                        leader,
                        p.log_start_offset,
                        p.high_watermark,
                        p.leader_epoch,
                        ids(&p.replicas),
                        ids(&p.in_sync_replicas)
                    )?;
                }
            }
            TopicCommand::Delete { name } => {
                admin.delete_topic(&name).await?;
                writeln!(out, "deleted topic {name}")?;
            }
            TopicCommand::SetFilters {
                topic,
                filters,
                params,
                on_error,
                none,
            } => {
                if none {
                    admin.clear_topic_filters(&topic).await?;
                    writeln!(out, "topic {topic}: no produce filters")?;
                } else {
                    let chain = ketch_client::ProduceFilters::new(filters)
                        .with_params(params)
                        .with_on_error(on_error.clone());
                    let set = admin.set_topic_filters(&topic, &chain).await?;
                    writeln!(
                        out,
                        "topic {topic}: produce filters {} (on-error {on_error})",
                        chain_text(&set)
                    )?;
                }
            }
        }
        client.close();
        Ok(())
    })
}

/// `name v1, other v3`.
fn chain_text(chain: &[(String, u32)]) -> String {
    chain
        .iter()
        .map(|(name, version)| format!("{name} v{version}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn group(args: GroupArgs) -> anyhow::Result<()> {
    let GroupArgs {
        connection,
        command,
    } = args;
    block_on(async {
        let client = connection.connect().await?;
        let admin = client.admin();
        let mut out = std::io::stdout().lock();
        match command {
            GroupCommand::List => {
                for group in admin.list_groups().await? {
                    writeln!(
                        out,
                        "{}\tstate={}\tmembers={}",
                        group.group, group.state, group.members
                    )?;
                }
            }
            GroupCommand::Describe { group } => {
                let description = admin.describe_group(&group).await?;
                writeln!(
                    out,
                    "group {} state={} epoch={}",
                    description.group, description.state, description.group_epoch
                )?;
                for member in &description.members {
                    let partitions: Vec<String> = member
                        .assignment
                        .iter()
                        .map(|tp| format!("{}-{}", tp.topic, tp.partition))
                        .collect();
                    writeln!(
                        out,
                        "  member {} client={} partitions=[{}]",
                        member.member_id,
                        member.client_id,
                        partitions.join(",")
                    )?;
                }
                writeln!(out, "TOPIC\tPARTITION\tCOMMITTED\tHIGH-WATERMARK\tLAG")?;
                for offset in &description.offsets {
                    let committed = offset
                        .committed_offset
                        .map_or("-".to_owned(), |o| o.to_string());
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}",
                        offset.partition.topic,
                        offset.partition.partition,
                        committed,
                        offset.high_watermark,
                        offset.lag
                    )?;
                }
                writeln!(out, "total lag {}", description.total_lag())?;
            }
        }
        client.close();
        Ok(())
    })
}

/// Deliveries awaited in order, at most this many outstanding.
const PRODUCE_OUTSTANDING_MAX: usize = 100_000;

pub fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        let acks = match args.acks {
            AcksArg::None => Acks::None,
            AcksArg::Leader => Acks::Leader,
            AcksArg::All => Acks::All,
        };
        let producer = client
            .producer(ProducerConfig {
                acks,
                linger: Duration::from_millis(args.linger_ms),
                idempotent: acks != Acks::None,
                ..ProducerConfig::default()
            })
            .await?;
        let progress = Progress::new("produced", false);
        let mut outstanding = std::collections::VecDeque::new();
        let mut delivered = 0u64;
        let stdin = std::io::stdin().lock();
        for line in stdin.lines() {
            let line = line.context("reading stdin")?;
            let (key, value) = match &args.key_separator {
                Some(sep) => match line.split_once(sep.as_str()) {
                    Some((key, value)) => (Some(key.to_owned()), value.to_owned()),
                    None => (None, line),
                },
                None => (None, line),
            };
            let record = ProducerRecord {
                topic: args.topic.clone(),
                partition: args.partition,
                key: key.map(Into::into),
                value: Some(value.into()),
                ..ProducerRecord::default()
            };
            outstanding.push_back(producer.send(record).await?);
            if outstanding.len() >= PRODUCE_OUTSTANDING_MAX {
                outstanding.pop_front().expect("non-empty").await?;
                delivered += 1;
                progress.update(delivered);
            }
        }
        producer.flush().await?;
        while let Some(delivery) = outstanding.pop_front() {
            delivery.await?;
            delivered += 1;
            progress.update(delivered);
        }
        producer.close().await?;
        progress.finish(delivered);
        let throttled = producer.throttled();
        if throttled.requests > 0 {
            eprintln!(
                "throttled: the broker's produce quota told {} request(s) to wait, {} ms in all",
                throttled.requests,
                throttled.total.as_millis()
            );
        }
        client.close();
        Ok(())
    })
}

fn parse_from(from: &str) -> anyhow::Result<Offset> {
    Ok(match from {
        "beginning" => Offset::Beginning,
        "end" => Offset::End,
        other => match other.strip_prefix('@') {
            Some(ts) => Offset::Timestamp(
                ts.parse()
                    .map_err(|_| anyhow!("--from @TIMESTAMP_MS needs a number, not {ts:?}"))?,
            ),
            None => Offset::At(other.parse().map_err(|_| {
                anyhow!("--from must be beginning, end, OFFSET or @TIMESTAMP_MS, not {other:?}")
            })?),
        },
    })
}

fn format_record(format: &str, record: &ConsumerRecord, out: &mut Vec<u8>) {
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('%', Some(&spec)) => {
                chars.next();
                match spec {
                    't' => out.extend_from_slice(record.topic.as_bytes()),
                    'p' => out.extend_from_slice(record.partition.to_string().as_bytes()),
                    'o' => out.extend_from_slice(record.offset.to_string().as_bytes()),
                    'k' => out.extend_from_slice(record.key.as_deref().unwrap_or_default()),
                    'v' => out.extend_from_slice(record.value.as_deref().unwrap_or_default()),
                    'T' => out.extend_from_slice(record.timestamp.to_string().as_bytes()),
                    '%' => out.push(b'%'),
                    other => {
                        out.push(b'%');
                        out.extend_from_slice(other.to_string().as_bytes());
                    }
                }
            }
            ('\\', Some(&'n')) => {
                chars.next();
                out.push(b'\n');
            }
            ('\\', Some(&'t')) => {
                chars.next();
                out.push(b'\t');
            }
            (c, _) => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'\n');
}

pub fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let from = parse_from(&args.from)?;
    let filter = args.filter.as_ref().map(|name| {
        ketch_client::FilterSpec::new(name)
            .with_params(args.filter_params.clone().unwrap_or_default())
    });
    block_on(async {
        let client = args.connection.connect().await?;
        let consumer = match &args.group {
            Some(group) => {
                let auto_offset_reset = match from {
                    Offset::Beginning => AutoOffsetReset::Earliest,
                    Offset::End => AutoOffsetReset::Latest,
                    _ => bail!(
                        "with --group, --from takes beginning or end (committed offsets decide the rest)"
                    ),
                };
                if args.partition.is_some() {
                    bail!(
                        "--partition and --group do not go together: the group assigns partitions"
                    );
                }
                let config = ConsumerConfig {
                    group: Some(group.clone()),
                    auto_offset_reset,
                    filter: filter.clone(),
                    ..ConsumerConfig::default()
                };
                client.subscribe(group.as_str(), [args.topic.as_str()], config)?
            }
            None => {
                let partitions: Vec<TopicPartition> = match args.partition {
                    Some(p) => vec![TopicPartition::new(&args.topic, p)],
                    None => {
                        let count = client.partition_count(&args.topic).await?;
                        (0..count)
                            .map(|p| TopicPartition::new(&args.topic, p))
                            .collect()
                    }
                };
                // The beginning and the end are what the reset policy gives a consumer
                // without a group: no seek. A seek right after `assign` races the consumer's
                // first lookup, which may already have started reading at the reset
                // position; the seek then restarts each partition, and the broker reads
                // (and counts as consumed) what it had sent twice. An explicit offset
                // outside the log is an error, not a silent reset.
                let (auto_offset_reset, seek) = match from {
                    Offset::Beginning => (AutoOffsetReset::Earliest, false),
                    Offset::End => (AutoOffsetReset::Latest, false),
                    Offset::At(_) => (AutoOffsetReset::Error, true),
                    _ => (AutoOffsetReset::Earliest, true),
                };
                let config = ConsumerConfig {
                    auto_offset_reset,
                    filter: filter.clone(),
                    ..ConsumerConfig::default()
                };
                let consumer = client.assign(config, &partitions)?;
                if seek {
                    for partition in &partitions {
                        consumer.seek(partition, from)?;
                    }
                }
                consumer
            }
        };
        let idle = args.timeout_ms.map(Duration::from_millis);
        let progress = Progress::new("consumed", true);
        let mut stdout = std::io::stdout().lock();
        let mut line = Vec::with_capacity(256);
        let mut count = 0u64;
        let mut last_record = Instant::now();
        let result = loop {
            if args.max_records.is_some_and(|max| count >= max) {
                break Ok(());
            }
            let next = match idle {
                Some(idle) => {
                    let remaining = idle.saturating_sub(last_record.elapsed());
                    match tokio::time::timeout(remaining, consumer.recv()).await {
                        Ok(next) => next,
                        Err(_) => break Ok(()),
                    }
                }
                None => tokio::select! {
                    next = consumer.recv() => next,
                    _ = tokio::signal::ctrl_c() => break Ok(()),
                },
            };
            match next {
                Ok(record) => {
                    line.clear();
                    format_record(&args.format, &record, &mut line);
                    if let Err(e) = stdout.write_all(&line) {
                        break Err(anyhow::Error::from(e).context("writing stdout"));
                    }
                    count += 1;
                    progress.update(count);
                    last_record = Instant::now();
                }
                Err(e) => break Err(e.into()),
            }
        };
        stdout.flush()?;
        progress.finish(count);
        if args.group.is_some() && result.is_ok() {
            consumer.commit().await.context("committing offsets")?;
        }
        consumer.close().await?;
        client.close();
        result
    })
}

/// A progress line on stderr (indicatif), drawn only when stderr is a terminal; silent
/// otherwise, so scripts and pipes see nothing.
struct Progress {
    bar: indicatif::ProgressBar,
    label: &'static str,
}

impl Progress {
    /// `also_needs_quiet_stdout`: records go to stdout, so draw only when stdout is not the
    /// same terminal (the progress line would be interleaved with them).
    fn new(label: &'static str, also_needs_quiet_stdout: bool) -> Progress {
        let visible = std::io::stderr().is_terminal()
            && !(also_needs_quiet_stdout && std::io::stdout().is_terminal());
        let bar = if visible {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix} {human_pos} records ({per_sec}) {elapsed}",
                )
                .expect("a valid progress template"),
            );
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        Progress { bar, label }
    }

    fn update(&self, count: u64) {
        self.bar.set_position(count);
    }

    fn finish(&self, count: u64) {
        if self.bar.is_hidden() {
            return;
        }
        let secs = self.bar.elapsed().as_secs_f64();
        self.bar.finish_and_clear();
        eprintln!("{} {count} records in {secs:.2}s", self.label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let record = ConsumerRecord {
            topic: "t".into(),
            partition: 2,
            offset: 41,
            timestamp: 1700,
            key: Some("k".into()),
            value: Some("v".into()),
            headers: vec![],
        };
        let cases = [
            ("%v", "v\n"),
            ("%t/%p@%o %k=%v %T", "t/2@41 k=v 1700\n"),
            ("100%% %x", "100% %x\n"),
            ("%k\\t%v", "k\tv\n"),
        ];
        for (format, expected) in cases {
            let mut out = Vec::new();
            format_record(format, &record, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{format}");
        }
    }

    #[test]
    fn from_values() {
        assert_eq!(parse_from("beginning").unwrap(), Offset::Beginning);
        assert_eq!(parse_from("end").unwrap(), Offset::End);
        assert_eq!(parse_from("42").unwrap(), Offset::At(42));
        assert_eq!(parse_from("@1700").unwrap(), Offset::Timestamp(1700));
        assert!(parse_from("yesterday").is_err());
        assert!(parse_from("@soon").is_err());
    }
}
