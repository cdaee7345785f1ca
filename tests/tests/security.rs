//! Security against real broker processes: auth modes, the first admin token, API tokens
//! (revocation and expiry take effect on the next request, without a restart), mutual TLS,
//! an ACL table over every API (each refused request answers `unauthorized` and changes
//! nothing), filters that cannot widen what a consumer reads, producer ids bound to their
//! principal, quotas, and the CLI contract.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use ketch_client::{
    Acl, Client, ClientCertificate, ClientConfig, ErrorCode, NewTopic, Operation, Quota,
};
use ketch_e2e::raw::RawClient;
use ketch_e2e::{TestBroker, ketch_bin};
use ketch_protocol::batch::{BatchBuilder, ProducerStamp};
use ketch_protocol::frame::encode_request;
use ketch_protocol::messages::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn admin_token(broker: &TestBroker) -> anyhow::Result<String> {
    let path = broker.process.data_dir.join("admin.token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn config_with_token(broker: &TestBroker, token: &str) -> ClientConfig {
    ClientConfig {
        bearer_token: Some(token.to_owned()),
        request_timeout: Duration::from_secs(10),
        ..broker.client_config()
    }
}

async fn client_with_token(broker: &TestBroker, token: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(config_with_token(broker, token)).await?)
}

/// A raw connection that authenticated with `token`.
async fn raw_as(broker: &TestBroker, token: &str) -> anyhow::Result<RawClient> {
    let raw = broker.raw().await?;
    let response = raw
        .call_ok(&AuthenticateRequest {
            mechanism: "token".into(),
            credential: token.to_owned(),
        })
        .await?;
    ensure!(!response.principal.is_empty());
    Ok(raw)
}

/// The error code of a response frame (0 when it succeeded).
fn frame_code(response: &[u8]) -> anyhow::Result<u16> {
    ensure!(response.len() >= 6, "response of {} bytes", response.len());
    Ok(u16::from_be_bytes([response[4], response[5]]))
}

fn code_name(code: u16) -> String {
    ErrorCode::from_u16(code).map_or_else(|| format!("code {code}"), |c| c.name().to_owned())
}

fn broker_code(error: &ketch_client::Error) -> Option<ErrorCode> {
    error.code()
}

/// `ketch token create` as `admin_token`: returns the token (the last word printed).
fn cli_token_create(broker: &TestBroker, admin: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = cli(broker, admin, &[&["token", "create"], args].concat())?;
    output
        .split_whitespace()
        .last()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("token create printed nothing"))
}

/// Runs a `ketch` client command with `KETCH_TOKEN`; fails with its stderr unless it succeeds.
fn cli(broker: &TestBroker, token: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = broker
        .process
        .cli()
        .env("KETCH_TOKEN", token)
        .args(args)
        .output()
        .context("running ketch")?;
    ensure!(
        output.status.success(),
        "ketch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Waits (bounded) until `check` is true, polling.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {limit:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_auth_writes_one_admin_token_and_refuses_strangers() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&["--auth", "required"])?;
    let token = admin_token(&broker)?;
    use std::os::unix::fs::PermissionsExt;
    let path = broker.process.data_dir.join("admin.token");
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "admin.token has mode {mode:o}");
    ensure!(token.starts_with("ketch_"), "{token}");

    // Without a credential only ApiVersions (and Authenticate) are served.
    let stranger = broker.raw().await?;
    stranger.call_ok(&ApiVersionsRequest {}).await?;
    let refused = stranger.call(&ListTopicsRequest {}).await?;
    ensure!(
        matches!(&refused, Err(e) if e.code == ErrorCode::AuthenticationFailed),
        "{refused:?}"
    );
    // A wrong token, a forged one with the right id, another mechanism: refused.
    let forged = format!("{}{}", &token[..token.len() - 4], "0000");
    for (mechanism, credential) in [
        ("token", "nonsense"),
        ("token", forged.as_str()),
        ("password", token.as_str()),
    ] {
        let answer = stranger
            .call(&AuthenticateRequest {
                mechanism: mechanism.into(),
                credential: credential.into(),
            })
            .await?;
        ensure!(
            matches!(&answer, Err(e) if e.code == ErrorCode::AuthenticationFailed),
            "{mechanism}: {answer:?}"
        );
    }
    // The SDK with a bad token fails at connect, with the code.
    let error = Client::connect(config_with_token(&broker, "ketch_bad"))
        .await
        .err()
        .ok_or_else(|| anyhow!("a bad token connected"))?;
    ensure!(
        broker_code(&error) == Some(ErrorCode::AuthenticationFailed),
        "{error}"
    );

    let admin = client_with_token(&broker, &token).await?;
    admin.admin().create_topic(NewTopic::new("t", 1)).await?;
    admin.close();

    // A restart keeps the tokens and writes no new admin token.
    broker.process.restart()?;
    ensure!(admin_token(&broker)? == token, "admin.token was rewritten");
    let admin = client_with_token(&broker, &token).await?;
    let topics = admin.admin().list_topics().await?;
    ensure!(topics.iter().any(|t| t.name == "t"));
    admin.close();
    let log = broker.process.log();
    ensure!(log.contains("ketch::audit"), "no audit line in:\n{log}");
    Ok(())
}

#[test]
fn anonymous_needs_loopback_or_an_explicit_flag() -> anyhow::Result<()> {
    for mode in ["none", "optional"] {
        let dir = tempfile::tempdir()?;
        let output = std::process::Command::new(ketch_bin())
            .args([
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--auth",
                mode,
                "--data-dir",
            ])
            .arg(dir.path())
            .env("KETCH_METRICS_LISTEN", "off")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "{mode}: started anonymous on 0.0.0.0"
        );
        ensure!(stderr.contains("allow_anonymous"), "{mode}: {stderr}");
    }
    // The loopback default is none, said loudly.
    let broker = TestBroker::start(&[])?;
    let log = broker.process.log();
    ensure!(log.contains("AUTHENTICATION IS OFF"), "{log}");
    ensure!(
        !broker.process.data_dir.join("admin.token").exists(),
        "auth none wrote an admin token"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stop_working_on_revocation_and_expiry_without_restart() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin = admin_token(&broker)?;
    cli(
        &broker,
        &admin,
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--allow",
            "describe",
            "--topic-prefix",
            "",
        ],
    )?;
    let alice = cli_token_create(&broker, &admin, &["--principal", "alice"])?;
    let listed = cli(&broker, &admin, &["token", "list"])?;
    ensure!(listed.contains("alice"), "{listed}");
    ensure!(
        !listed.contains(&alice),
        "token list shows a secret:\n{listed}"
    );

    let client = client_with_token(&broker, &alice).await?;
    client.admin().list_topics().await?;
    // Revoked by the token itself; the same connection's next request fails.
    let revoked = cli(&broker, &admin, &["token", "revoke", &alice])?;
    ensure!(revoked.starts_with("revoked token"), "{revoked}");
    let error = client
        .admin()
        .list_topics()
        .await
        .err()
        .ok_or_else(|| anyhow!("a revoked token still works"))?;
    ensure!(
        broker_code(&error) == Some(ErrorCode::AuthenticationFailed),
        "{error}"
    );
    client.close();

    // An expiring token works, then stops on its own.
    let short = cli_token_create(
        &broker,
        &admin,
        &["--principal", "alice", "--expires-in", "1500ms"],
    )?;
    let client = client_with_token(&broker, &short).await?;
    client.admin().list_topics().await?;
    eventually("the token expires", Duration::from_secs(10), || {
        let admin = client.admin();
        async move {
            matches!(admin.list_topics().await, Err(e) if e.code() == Some(ErrorCode::AuthenticationFailed))
        }
    })
    .await?;
    client.close();
    // Revoking by id works too; an unknown one is an error that says so.
    let another = cli_token_create(&broker, &admin, &["--principal", "bob"])?;
    let id = another.split('_').nth(1).unwrap_or_default().to_owned();
    ensure!(cli(&broker, &admin, &["token", "revoke", &id])?.contains(&id));
    ensure!(cli(&broker, &admin, &["token", "revoke", "nope"]).is_err());
    Ok(())
}

/// A filter module (kept-even), a topic with records and a group with a committed offset.
async fn populate(admin: &Client, raw_admin: &RawClient) -> anyhow::Result<()> {
    let a = admin.admin();
    a.create_topic(NewTopic::new("t", 1)).await?;
    let producer = admin.producer(Default::default()).await?;
    producer
        .send(ketch_client::ProducerRecord::new("t", "v1"))
        .await?
        .await?;
    producer.close().await?;
    let module = wat::parse_file(repo().join("wasm-filters/examples/wat/keep-even.wat"))?;
    a.upload_filter("f", "", module).await?;
    raw_admin
        .call_ok(&OffsetCommitRequest {
            group: "g".into(),
            member_id: String::new(),
            member_epoch: -1,
            offsets: vec![CommitOffset {
                topic: "t".into(),
                partition: 0,
                offset: 1,
                metadata: String::new(),
            }],
        })
        .await?;
    Ok(())
}

/// Everything a refused request must leave alone.
async fn snapshot(raw: &RawClient) -> anyhow::Result<String> {
    let topics = raw.call_ok(&ListTopicsRequest {}).await?;
    let hw = raw.high_watermark("t", 0).await?;
    let groups = raw.call_ok(&ListGroupsRequest {}).await?;
    let offsets = raw
        .call_ok(&OffsetFetchRequest {
            group: "g".into(),
            partitions: None,
        })
        .await?;
    let filters = raw.call_ok(&FilterListRequest {}).await?;
    let security = raw.call_ok(&SecurityListRequest {}).await?;
    let configs = raw
        .call_ok(&DescribeTopicRequest { name: "t".into() })
        .await?
        .configs;
    Ok(format!(
        "{topics:?}\n{hw}\n{groups:?}\n{offsets:?}\n{filters:?}\n{security:?}\n{configs:?}"
    ))
}

fn produce_request(topic: &str, records: Bytes) -> ProduceRequest {
    ProduceRequest {
        acks: Acks::All,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition {
                partition: 0,
                records,
            }],
        }],
    }
}

fn batch(producer_id: i64, sequence: i32) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024);
    if producer_id >= 0 {
        builder = builder.with_producer(ProducerStamp {
            producer_id,
            producer_epoch: 0,
            base_sequence: sequence,
        });
    }
    assert!(builder.try_append(0, None, Some(b"x"), &[]));
    builder.finish()
}

/// What one API answers a principal without permissions.
enum Expect {
    Unauthorized,
    /// Served, but shows nothing (listings narrowed to what the principal may describe).
    Empty,
    Served,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_without_permission_is_unauthorized_and_changes_nothing() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin_secret = admin_token(&broker)?;
    let admin = client_with_token(&broker, &admin_secret).await?;
    let raw_admin = raw_as(&broker, &admin_secret).await?;
    populate(&admin, &raw_admin).await?;
    let nobody = admin.admin().create_token("mallory", None).await?;
    let before = snapshot(&raw_admin).await?;
    let mallory = raw_as(&broker, &nobody.token).await?;

    let acl = AclEntry {
        principal: "mallory".into(),
        resource_type: 4,
        pattern_type: 0,
        resource_name: String::new(),
        operation: 5,
        permission: 0,
    };
    use Expect::*;
    let cases: Vec<(ApiKey, Bytes, Expect)> = vec![
        (
            ApiKey::Metadata,
            encode_request(&MetadataRequest {
                topics: Some(vec!["t".into()]),
            }),
            Unauthorized,
        ),
        (
            ApiKey::Metadata,
            encode_request(&MetadataRequest { topics: None }),
            Empty,
        ),
        (
            ApiKey::CreateTopic,
            encode_request(&CreateTopicRequest {
                name: "new".into(),
                partitions: 1,
                replication_factor: 1,
                configs: vec![],
            }),
            Unauthorized,
        ),
        (
            ApiKey::DeleteTopic,
            encode_request(&DeleteTopicRequest { name: "t".into() }),
            Unauthorized,
        ),
        (
            ApiKey::ListTopics,
            encode_request(&ListTopicsRequest {}),
            Empty,
        ),
        (
            ApiKey::DescribeTopic,
            encode_request(&DescribeTopicRequest { name: "t".into() }),
            Unauthorized,
        ),
        (
            ApiKey::AlterTopicConfig,
            encode_request(&AlterTopicConfigRequest {
                name: "t".into(),
                configs: vec![ConfigEntry {
                    key: "cleanup.policy".into(),
                    value: "compact".into(),
                }],
            }),
            Unauthorized,
        ),
        (
            ApiKey::Produce,
            encode_request(&produce_request("t", batch(-1, 0))),
            Unauthorized,
        ),
        (
            ApiKey::Fetch,
            encode_request(&FetchRequest {
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }),
            Unauthorized,
        ),
        (
            ApiKey::ListOffsets,
            encode_request(&ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition {
                    topic: "t".into(),
                    partition: 0,
                    spec: OffsetSpec::Latest,
                }],
            }),
            Unauthorized,
        ),
        (
            ApiKey::Subscribe,
            encode_request(&SubscribeRequest {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                push_bytes_max: 1 << 20,
            }),
            Unauthorized,
        ),
        (
            ApiKey::SubscribeMany,
            encode_request(&SubscribeManyRequest {
                partitions: vec![SubscribePartition {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    push_bytes_max: 1 << 20,
                }],
            }),
            Unauthorized,
        ),
        (
            ApiKey::GroupHeartbeat,
            encode_request(&GroupHeartbeatRequest {
                group: "g".into(),
                member_id: String::new(),
                member_epoch: 0,
                client_id: "c".into(),
                session_timeout_ms: 10_000,
                topics: vec!["t".into()],
                owned: vec![],
            }),
            Unauthorized,
        ),
        (
            ApiKey::GroupLeave,
            encode_request(&GroupLeaveRequest {
                group: "g".into(),
                member_id: "m".into(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::OffsetCommit,
            encode_request(&OffsetCommitRequest {
                group: "g".into(),
                member_id: String::new(),
                member_epoch: -1,
                offsets: vec![CommitOffset {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    metadata: String::new(),
                }],
            }),
            Unauthorized,
        ),
        (
            ApiKey::OffsetFetch,
            encode_request(&OffsetFetchRequest {
                group: "g".into(),
                partitions: None,
            }),
            Unauthorized,
        ),
        (
            ApiKey::ListGroups,
            encode_request(&ListGroupsRequest {}),
            Empty,
        ),
        (
            ApiKey::DescribeGroup,
            encode_request(&DescribeGroupRequest { group: "g".into() }),
            Unauthorized,
        ),
        (
            ApiKey::FindCoordinator,
            encode_request(&FindCoordinatorRequest { group: "g".into() }),
            Unauthorized,
        ),
        (
            ApiKey::InitProducerId,
            encode_request(&InitProducerIdRequest {}),
            Unauthorized,
        ),
        (
            ApiKey::FilterUpload,
            encode_request(&FilterUploadRequest {
                name: "f2".into(),
                description: String::new(),
                module: Bytes::from_static(b"\0asm"),
            }),
            Unauthorized,
        ),
        (
            ApiKey::FilterList,
            encode_request(&FilterListRequest {}),
            Empty,
        ),
        (
            ApiKey::FilterDelete,
            encode_request(&FilterDeleteRequest {
                name: "f".into(),
                force: true,
            }),
            Unauthorized,
        ),
        (
            ApiKey::ApiVersions,
            encode_request(&ApiVersionsRequest {}),
            Served,
        ),
        (
            ApiKey::FilterDescribe,
            encode_request(&FilterDescribeRequest { name: "f".into() }),
            Unauthorized,
        ),
        (
            ApiKey::SubscribeFiltered,
            encode_request(&SubscribeFilteredRequest {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                push_bytes_max: 1 << 20,
                filter: "f".into(),
                filter_version: 0,
                params: String::new(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::Authenticate,
            encode_request(&AuthenticateRequest {
                mechanism: "token".into(),
                credential: nobody.token.clone(),
            }),
            Served,
        ),
        (
            ApiKey::TokenCreate,
            encode_request(&TokenCreateRequest {
                principal: "mallory".into(),
                expires_in_ms: -1,
            }),
            Unauthorized,
        ),
        (
            ApiKey::TokenRevoke,
            encode_request(&TokenRevokeRequest {
                token_or_id: nobody.id.clone(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::AclChange,
            encode_request(&AclChangeRequest {
                add: vec![acl],
                remove: vec![],
            }),
            Unauthorized,
        ),
        (
            ApiKey::QuotaSet,
            encode_request(&QuotaSetRequest {
                principal: "mallory".into(),
                produce_bytes_per_s: 1,
                fetch_bytes_per_s: 1,
            }),
            Unauthorized,
        ),
        (
            ApiKey::SecurityList,
            encode_request(&SecurityListRequest {}),
            Unauthorized,
        ),
        (
            ApiKey::TopicSetFilters,
            encode_request(&TopicSetFiltersRequest {
                topic: "t".into(),
                filters: vec![],
                params: String::new(),
                on_error: "fail".into(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::TopicFilters,
            encode_request(&TopicFiltersRequest { topic: "t".into() }),
            Unauthorized,
        ),
        (
            ApiKey::TransformCreate,
            encode_request(&TransformCreateRequest {
                name: "x".into(),
                filter: "f".into(),
                input: "t".into(),
                outputs: vec!["t2".into()],
                from: "beginning".into(),
                params: String::new(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::TransformDescribe,
            encode_request(&TransformDescribeRequest {
                name: String::new(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::TransformAlter,
            encode_request(&TransformAlterRequest {
                name: "x".into(),
                action: "delete".into(),
            }),
            Unauthorized,
        ),
        (
            ApiKey::TransferLeader,
            encode_request(&TransferLeaderRequest {
                topic: "t".into(),
                partition: 0,
                broker: 1,
            }),
            Unauthorized,
        ),
        (
            ApiKey::ReassignPartition,
            encode_request(&ReassignPartitionRequest {
                topic: "t".into(),
                partition: 0,
                replicas: vec![1],
            }),
            Unauthorized,
        ),
        (
            ApiKey::AddBroker,
            encode_request(&AddBrokerRequest {
                node_id: 4,
                address: "127.0.0.1:1".into(),
            }),
            Unauthorized,
        ),
    ];
    // Every API is in the table.
    for key in ApiKey::ALL {
        ensure!(
            cases.iter().any(|(k, _, _)| k == key),
            "{} is not checked",
            key.name()
        );
    }
    for (key, request, expect) in &cases {
        let response = mallory.request_raw(request).await?;
        let code = frame_code(&response)?;
        match expect {
            Unauthorized => ensure!(
                code == ErrorCode::Unauthorized.as_u16(),
                "{}: answered {} instead of unauthorized",
                key.name(),
                code_name(code)
            ),
            Served | Empty => ensure!(code == 0, "{}: answered {}", key.name(), code_name(code)),
        }
        if matches!(expect, Empty) {
            // Only the framing and empty lists: no name of anything leaks.
            let text = String::from_utf8_lossy(&response);
            ensure!(
                !text.contains('t') || *key == ApiKey::Metadata,
                "{}: shows something: {text:?}",
                key.name()
            );
        }
    }
    let metadata = mallory.call_ok(&MetadataRequest { topics: None }).await?;
    ensure!(metadata.topics.is_empty(), "{metadata:?}");
    ensure!(
        snapshot(&raw_admin).await? == before,
        "a refused request changed something"
    );
    let log = broker.process.log();
    ensure!(
        log.contains("ketch::audit") && log.contains("mallory"),
        "denials are not audited:\n{log}"
    );
    admin.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_allow_what_they_say_and_filters_do_not_widen_reads() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin_secret = admin_token(&broker)?;
    let admin = client_with_token(&broker, &admin_secret).await?;
    populate(&admin, &raw_as(&broker, &admin_secret).await?).await?;
    let a = admin.admin();
    a.create_topic(NewTopic::new("secret", 1)).await?;
    let reader = a.create_token("reader", None).await?;
    a.add_acls(&[
        Acl::allow("reader", Operation::Read).topic("t"),
        Acl::allow("reader", Operation::Read).filter("f"),
        Acl::allow("reader", Operation::Read).group("g"),
    ])
    .await?;
    let raw = raw_as(&broker, &reader.token).await?;
    // Read implies describe; write is not read.
    raw.call_ok(&DescribeTopicRequest { name: "t".into() })
        .await?;
    let listed = raw.call_ok(&ListTopicsRequest {}).await?;
    ensure!(
        listed
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            == ["t"],
        "{listed:?}"
    );
    let records = raw.read_all("t", 0).await?;
    ensure!(records.len() == 1, "{records:?}");
    let produced = raw.call(&produce_request("t", batch(-1, 0))).await?;
    ensure!(
        matches!(&produced, Err(e) if e.code == ErrorCode::Unauthorized),
        "{produced:?}"
    );
    // Through the filter: allowed on t, refused on a topic it cannot read directly.
    for (topic, allowed) in [("t", true), ("secret", false)] {
        let request = SubscribeFilteredRequest {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            push_bytes_max: 1 << 20,
            filter: "f".into(),
            filter_version: 0,
            params: String::new(),
        };
        let mut open = raw.open_request(&encode_request(&request)).await?;
        let frame = open.read_frame().await?;
        let code = frame_code(&frame)?;
        ensure!(
            (code == 0) == allowed && (allowed || code == ErrorCode::Unauthorized.as_u16()),
            "{topic}: {}",
            code_name(code)
        );
    }
    // A deny wins over the allow, at once (the decision cache follows changes).
    a.add_acls(&[Acl::deny("reader", Operation::Read).topic_prefix("")])
        .await?;
    let fetched = raw.read_all("t", 0).await;
    ensure!(fetched.is_err(), "read after a deny: {fetched:?}");
    let removed = a
        .remove_acls(&[Acl::deny("reader", Operation::Read).topic_prefix("")])
        .await?;
    ensure!(removed == 1);
    ensure!(raw.read_all("t", 0).await?.len() == 1);
    admin.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_belong_to_the_principal_that_got_them() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin_secret = admin_token(&broker)?;
    let admin = client_with_token(&broker, &admin_secret).await?;
    let a = admin.admin();
    a.create_topic(NewTopic::new("t", 1)).await?;
    let alice = a.create_token("alice", None).await?;
    let bob = a.create_token("bob", None).await?;
    a.add_acls(&[
        Acl::allow("alice", Operation::Write).topic("t"),
        Acl::allow("bob", Operation::Write).topic("t"),
    ])
    .await?;
    let alice_raw = raw_as(&broker, &alice.token).await?;
    let bob_raw = raw_as(&broker, &bob.token).await?;
    let raw_admin = raw_as(&broker, &admin_secret).await?;
    let id = alice_raw
        .call_ok(&InitProducerIdRequest {})
        .await?
        .producer_id;
    let bob_id = bob_raw
        .call_ok(&InitProducerIdRequest {})
        .await?
        .producer_id;
    ensure!(id != bob_id);

    let cases = [
        (
            "bob stamps alice's id",
            &bob_raw,
            id,
            ErrorCode::Unauthorized,
        ),
        (
            "bob stamps an id never issued",
            &bob_raw,
            bob_id + 1_000_000,
            ErrorCode::UnknownProducer,
        ),
        (
            "alice stamps bob's id",
            &alice_raw,
            bob_id,
            ErrorCode::Unauthorized,
        ),
    ];
    for (name, raw, producer_id, expected) in cases {
        let response = raw
            .call_ok(&produce_request("t", batch(producer_id, 0)))
            .await?;
        let partition = &response.topics[0].partitions[0];
        ensure!(partition.error == expected, "{name}: {:?}", partition.error);
        ensure!(
            raw_admin.high_watermark("t", 0).await? == 0,
            "{name}: appended"
        );
    }
    let own = alice_raw.produce("t", 0, batch(id, 0)).await?;
    ensure!(own.error == ErrorCode::None, "{own:?}");
    ensure!(raw_admin.high_watermark("t", 0).await? == 1);
    // The SDK's idempotent producer works under its own id.
    let client = client_with_token(&broker, &alice.token).await?;
    let producer = client
        .producer(ketch_client::ProducerConfig {
            idempotent: true,
            ..Default::default()
        })
        .await?;
    producer
        .send(ketch_client::ProducerRecord::new("t", "sdk"))
        .await?
        .await?;
    producer.close().await?;
    client.close();
    admin.close();
    Ok(())
}

/// A CA, and a client certificate with `cn` it signed (PEM chain, PEM key).
fn client_pki(dir: &std::path::Path, cn: &str) -> anyhow::Result<(PathBuf, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "client CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(vec!["client".to_owned()])?;
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    let path = dir.join(format!("client-ca-{cn}.pem"));
    std::fs::write(&path, ca_cert.pem())?;
    Ok((path, cert.pem(), key.serialize_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_its_principal() -> anyhow::Result<()> {
    let pki = tempfile::tempdir()?;
    let (ca, cert, key) = client_pki(pki.path(), "carol")?;
    let (_, stranger_cert, stranger_key) = client_pki(pki.path(), "mallory")?;
    let ca_arg = ca.display().to_string();
    let broker = TestBroker::start(&["--auth", "required", "--client-ca", &ca_arg])?;
    let admin = client_with_token(&broker, &admin_token(&broker)?).await?;
    let with_cert = |cert: &str, key: &str| ClientConfig {
        client_certificate: Some(ClientCertificate::Pem {
            certificate_chain: cert.as_bytes().to_vec(),
            private_key: key.as_bytes().to_vec(),
        }),
        request_timeout: Duration::from_secs(10),
        ..broker.client_config()
    };
    let carol = Client::connect(with_cert(&cert, &key)).await?;
    // Authenticated as carol (not refused as a stranger), who may do nothing yet.
    let error = carol
        .admin()
        .create_topic(NewTopic::new("c", 1))
        .await
        .err()
        .ok_or_else(|| anyhow!("carol created a topic without an ACL"))?;
    ensure!(error.code() == Some(ErrorCode::Unauthorized), "{error}");
    admin
        .admin()
        .add_acls(&[Acl::allow("carol", Operation::Create).cluster()])
        .await?;
    carol.admin().create_topic(NewTopic::new("c", 1)).await?;
    carol.close();
    // A certificate another CA signed does not get through the handshake.
    let refused = Client::connect(ClientConfig {
        connect_timeout: Duration::from_secs(5),
        ..with_cert(&stranger_cert, &stranger_key)
    })
    .await;
    let refused = match refused {
        Err(e) => e.to_string(),
        Ok(client) => match client.admin().list_topics().await {
            Err(e) => e.to_string(),
            Ok(_) => bail!("a certificate of an unknown CA was accepted"),
        },
    };
    ensure!(!refused.is_empty());
    admin.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_acls_and_quotas() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin = admin_token(&broker)?;
    let rule = [
        "--principal",
        "alice",
        "--allow",
        "read",
        "--topic",
        "orders",
    ];
    let added = cli(&broker, &admin, &[&["acl", "add"][..], &rule].concat())?;
    ensure!(added.contains("allow alice read topic orders"), "{added}");
    for (args, expected) in [
        (
            vec![
                "--principal",
                "bob",
                "--deny",
                "write",
                "--topic-prefix",
                "tmp.",
            ],
            "deny bob write topic-prefix tmp.",
        ),
        (
            vec!["--principal", "ops", "--allow", "alter", "--cluster"],
            "allow ops alter cluster",
        ),
        (
            vec!["--principal", "c", "--allow", "read", "--group", "g1"],
            "allow c read group g1",
        ),
        (
            vec![
                "--principal",
                "d",
                "--allow",
                "deploy-filter",
                "--filter",
                "f",
            ],
            "allow d deploy-filter filter f",
        ),
    ] {
        cli(&broker, &admin, &[&["acl", "add"][..], &args].concat())?;
        let listed = cli(&broker, &admin, &["acl", "list"])?;
        ensure!(
            listed.contains(expected),
            "{expected} missing from:\n{listed}"
        );
    }
    // Bad rules are refused with a reason and add nothing.
    for bad in [
        vec!["--principal", "x", "--allow", "fly", "--topic", "t"],
        vec!["--principal", "x", "--allow", "read"],
        vec![
            "--principal",
            "x",
            "--allow",
            "read",
            "--deny",
            "read",
            "--topic",
            "t",
        ],
    ] {
        ensure!(
            cli(&broker, &admin, &[&["acl", "add"][..], &bad].concat()).is_err(),
            "{bad:?}"
        );
    }
    ensure!(cli(&broker, &admin, &["acl", "list"])?.lines().count() == 5);
    cli(&broker, &admin, &[&["acl", "remove"][..], &rule].concat())?;
    ensure!(!cli(&broker, &admin, &["acl", "list"])?.contains("alice"));
    ensure!(cli(&broker, &admin, &[&["acl", "remove"][..], &rule].concat()).is_err());

    cli(
        &broker,
        &admin,
        &[
            "quota",
            "set",
            "--principal",
            "alice",
            "--produce-bytes-per-s",
            "1000",
            "--fetch-bytes-per-s",
            "2000",
        ],
    )?;
    let quotas = cli(&broker, &admin, &["quota", "list"])?;
    ensure!(quotas.contains("alice\t1000\t2000"), "{quotas}");
    // Without a token the commands fail, saying why.
    let output = broker.process.cli().args(["acl", "list"]).output()?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("authentication_failed"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_a_greedy_producer_to_its_rate() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin_secret = admin_token(&broker)?;
    let admin = client_with_token(&broker, &admin_secret).await?;
    let a = admin.admin();
    a.create_topic(NewTopic::new("t", 1)).await?;
    let greedy = a.create_token("greedy", None).await?;
    let polite = a.create_token("polite", None).await?;
    a.add_acls(&[
        Acl::allow("greedy", Operation::Write).topic("t"),
        Acl::allow("polite", Operation::Write).topic("t"),
    ])
    .await?;
    const RATE: u64 = 200 * 1024;
    a.set_quota(&Quota {
        principal: "greedy".into(),
        produce_bytes_per_s: RATE,
        fetch_bytes_per_s: 0,
    })
    .await?;
    let greedy_raw = raw_as(&broker, &greedy.token).await?;
    let polite_raw = raw_as(&broker, &polite.token).await?;
    let chunk = {
        let mut builder = BatchBuilder::new(1024 * 1024);
        let value = vec![7u8; 16 * 1024];
        for _ in 0..4 {
            assert!(builder.try_append(0, None, Some(&value), &[]));
        }
        builder.finish()
    };
    // Greedy sends as fast as answers come, for ~3 s; polite sends one small batch at a time.
    let started = Instant::now();
    let run = Duration::from_secs(3);
    let greedy_task = async {
        // The raw client ignores the throttle hint: the broker answers each request at once
        // and holds the connection's next one back until the hint has run out, so the first
        // two are answered at once; the rate is what followed them, over the time since
        // (not since the start: the first answer may come late on a busy machine).
        let mut answers = 0u64;
        let mut counted = 0u64;
        let mut since = Instant::now();
        while started.elapsed() < run {
            greedy_raw.produce("t", 0, chunk.clone()).await?;
            answers += 1;
            match answers {
                1 => {}
                2 => since = Instant::now(),
                _ => counted += chunk.len() as u64,
            }
        }
        anyhow::Ok((counted, since.elapsed()))
    };
    let polite_task = async {
        let mut latencies = Vec::new();
        while started.elapsed() < run {
            let one = Instant::now();
            polite_raw.produce("t", 0, batch(-1, 0)).await?;
            latencies.push(one.elapsed());
        }
        latencies.sort();
        anyhow::Ok(latencies)
    };
    let (greedy_result, polite_result) = tokio::join!(greedy_task, polite_task);
    let (counted, elapsed) = greedy_result?;
    let latencies = polite_result?;
    let rate = counted as f64 / elapsed.as_secs_f64();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "quota {RATE} B/s: greedy produced {rate:.0} B/s over {elapsed:?}; polite p99 {p99:?} over {} requests",
        latencies.len()
    );
    ensure!(
        (rate - RATE as f64).abs() <= RATE as f64 * 0.10,
        "greedy ran at {rate:.0} B/s, quota {RATE}"
    );
    ensure!(p99 < Duration::from_millis(250), "polite p99 {p99:?}");

    // A reader over its fetch quota is pushed the records that much slower.
    let reader = a.create_token("reader", None).await?;
    a.add_acls(&[Acl::allow("reader", Operation::Read).topic("t")])
        .await?;
    a.set_quota(&Quota {
        principal: "reader".into(),
        produce_bytes_per_s: 0,
        fetch_bytes_per_s: RATE,
    })
    .await?;
    let reader_raw = raw_as(&broker, &reader.token).await?;
    let end = reader_raw.high_watermark("t", 0).await?;
    let mut subscription = reader_raw
        .subscribe(&SubscribeRequest {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            push_bytes_max: 64 * 1024,
        })
        .await?;
    let started = Instant::now();
    // Each push waits for the ones before it: the last one's bytes are not yet paid for when
    // it arrives, so the rate is counted without them.
    let (mut last_push, mut bytes, mut offset) = (0u64, 0u64, 0i64);
    while offset < end {
        let push = subscription
            .next()
            .await?
            .map_err(|e| anyhow!("push failed: {e}"))?;
        let batches: Vec<_> = ketch_protocol::batch::BatchSlices::new(push.records.clone())
            .collect::<Result<_, _>>()?;
        let Some((last, _)) = batches.last() else {
            continue;
        };
        offset = last.next_offset();
        last_push = push.records.len() as u64;
        bytes += last_push;
    }
    let elapsed = started.elapsed();
    let bytes = bytes - last_push;
    let rate = bytes as f64 / elapsed.as_secs_f64();
    println!(
        "fetch quota {RATE} B/s: subscription read {rate:.0} B/s ({bytes} bytes before the last push, {elapsed:?})"
    );
    ensure!(
        (rate - RATE as f64).abs() <= RATE as f64 * 0.10,
        "the reader ran at {rate:.0} B/s, quota {RATE}"
    );
    admin.close();
    Ok(())
}

/// A producer over its quota is told how long to wait (Produce v2's `throttle_time_ms`),
/// waits, says so in its stats and in the CLI, and stays within its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_hint_keeps_a_producer_within_its_quota() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let admin_secret = admin_token(&broker)?;
    let admin = client_with_token(&broker, &admin_secret).await?;
    let a = admin.admin();
    a.create_topic(NewTopic::new("t", 1)).await?;
    let greedy = a.create_token("greedy", None).await?;
    a.add_acls(&[Acl::allow("greedy", Operation::Write).topic("t")])
        .await?;
    const RATE: u64 = 200 * 1024;
    a.set_quota(&Quota {
        principal: "greedy".into(),
        produce_bytes_per_s: RATE,
        fetch_bytes_per_s: 0,
    })
    .await?;
    // The hint is on the wire: two requests at once, the second is told to wait for the
    // first's bytes (answered at once, not held back).
    let raw = raw_as(&broker, &greedy.token).await?;
    let chunk = {
        let mut builder = BatchBuilder::new(1024 * 1024);
        assert!(builder.try_append(0, None, Some(&vec![1u8; 40 * 1024]), &[]));
        builder.finish()
    };
    let first = raw.call_ok(&produce_request("t", chunk.clone())).await?;
    let asked = Instant::now();
    let second = raw.call_ok(&produce_request("t", chunk.clone())).await?;
    let answered_in = asked.elapsed();
    let expected_ms = chunk.len() as u64 * 1000 / RATE;
    println!(
        "hints: {} ms then {} ms (expected ~{expected_ms} ms), second answered in {answered_in:?}",
        first.throttle_time_ms, second.throttle_time_ms
    );
    ensure!(first.throttle_time_ms == 0, "{first:?}");
    ensure!(
        u64::from(second.throttle_time_ms).abs_diff(expected_ms) <= 20,
        "second hint {} ms, expected ~{expected_ms}",
        second.throttle_time_ms
    );
    ensure!(
        answered_in < Duration::from_millis(expected_ms),
        "answered at once, with the hint: {answered_in:?}"
    );
    // Let that debt run out before the measured run.
    tokio::time::sleep(Duration::from_millis(2 * expected_ms)).await;

    // The client honours the hints: as fast as it can for ~5 s, in small batches so the
    // rate is measured over many requests.
    let client = client_with_token(&broker, &greedy.token).await?;
    let producer = client
        .producer(ketch_client::ProducerConfig {
            batch_bytes_max: 8 * 1024,
            // Little queued ahead, so the run ends soon after its last send.
            buffer_bytes_max: 64 * 1024,
            linger: Duration::from_millis(1),
            ..Default::default()
        })
        .await?;
    let value = Bytes::from(vec![7u8; 4000]);
    let started = Instant::now();
    let run = Duration::from_secs(5);
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
    while started.elapsed() < run {
        let delivery = producer
            .send(ketch_client::ProducerRecord::new("t", value.clone()))
            .await?;
        let acks = acks_tx.clone();
        tokio::spawn(async move {
            let _ = acks.send(delivery.await.map(|_| Instant::now()));
        });
    }
    drop(acks_tx);
    let mut acked = Vec::new();
    while let Some(ack) = acks_rx.recv().await {
        acked.push(ack?);
    }
    acked.sort();
    let throttled = producer.throttled();
    // Acks come in groups (the requests in flight together); count from the first one and
    // leave out what it carried: the records acknowledged after it, over the time after it.
    let (first, last) = (acked[0], *acked.last().expect("acks"));
    let after_first = acked.iter().filter(|at| **at > first).count() as u64;
    let rate = (after_first * value.len() as u64) as f64 / (last - first).as_secs_f64();
    println!(
        "quota {RATE} B/s: the producer's records went at {rate:.0} B/s ({} records, {:?}); \
         throttled {} times, {:?} in all",
        acked.len(),
        last - first,
        throttled.requests,
        throttled.total
    );
    ensure!(throttled.requests > 0, "the producer saw no hint");
    ensure!(
        (rate - RATE as f64).abs() <= RATE as f64 * 0.10,
        "the producer ran at {rate:.0} B/s, quota {RATE}"
    );
    producer.close().await?;
    client.close();

    // The CLI says when it was throttled: at 1 KiB/s, one raw request leaves the principal
    // ~40 s in debt, so the CLI's one request is answered with a hint.
    a.set_quota(&Quota {
        principal: "greedy".into(),
        produce_bytes_per_s: 1024,
        fetch_bytes_per_s: 0,
    })
    .await?;
    raw.call_ok(&produce_request("t", chunk.clone())).await?;
    let output = broker
        .process
        .cli()
        .env("KETCH_TOKEN", &greedy.token)
        .args(["produce", "t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(b"one\n")?;
            child.wait_with_output()
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{stderr}");
    ensure!(
        stderr.contains("throttled: the broker's produce quota told 1 request(s) to wait"),
        "{stderr}"
    );
    admin.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_ip_holds_at_most_its_connections() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--connections-per-ip-max", "2"])?;
    let first = broker.raw().await?;
    let second = broker.raw().await?;
    first.call_ok(&ApiVersionsRequest {}).await?;
    second.call_ok(&ApiVersionsRequest {}).await?;
    let third = broker.raw().await;
    ensure!(
        third.is_err(),
        "a third connection from one IP was accepted"
    );
    // Those already open are still served, and a place freed is a place taken.
    first.call_ok(&ApiVersionsRequest {}).await?;
    second.close();
    eventually(
        "a freed place is taken",
        Duration::from_secs(10),
        || async {
            match broker.raw().await {
                Ok(raw) => raw.call_ok(&ApiVersionsRequest {}).await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await?;
    let log = broker.process.log();
    ensure!(log.contains("connection_limit"), "not audited:\n{log}");
    Ok(())
}

/// The Python with aioquic (`scripts/test-all.sh` makes the venv and sets `KETCH_PYTHON`).
fn python() -> PathBuf {
    std::env::var_os("KETCH_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// Runs the aioquic client; its JSON line.
fn aioquic(broker: &TestBroker, token: &str) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(python())
        .arg(repo().join("tests/quic/aioquic_client.py"))
        .arg(broker.process.addr.ip().to_string())
        .arg(broker.process.addr.port().to_string())
        .arg(&broker.process.ca)
        .arg(token)
        .output()
        .with_context(|| {
            format!(
                "running {} (set KETCH_PYTHON to a Python with aioquic; scripts/test-all.sh makes one)",
                python().display()
            )
        })?;
    ensure!(
        output.status.success(),
        "aioquic client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_quic_stack_handshakes_authenticates_and_asks() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--auth", "required"])?;
    let token = admin_token(&broker)?;
    let admin = client_with_token(&broker, &token).await?;
    admin
        .admin()
        .create_topic(NewTopic::new("from-rust", 1))
        .await?;
    admin.close();
    let seen = aioquic(&broker, &token)?;
    println!("aioquic saw {seen}");
    ensure!(seen["alpn"] == "ketch/1", "{seen}");
    ensure!(
        seen["authenticate_code"] == 0 && seen["principal"] == "admin",
        "{seen}"
    );
    ensure!(seen["list_topics_code"] == 0, "{seen}");
    let topics = seen["topics"].as_array().cloned().unwrap_or_default();
    ensure!(topics.contains(&serde_json::json!("from-rust")), "{seen}");
    // A bad token: the same stack is refused, by the stable code.
    let refused = aioquic(&broker, "ketch_nope")?;
    ensure!(
        refused["authenticate_code"] == ErrorCode::AuthenticationFailed.as_u16()
            && refused["list_topics_code"] == ErrorCode::AuthenticationFailed.as_u16(),
        "{refused}"
    );
    Ok(())
}
