//! `ketch`: the broker (`ketch serve`) and the command-line client.

mod cli;
mod cluster_cli;
mod filter_cli;
mod metrics_http;
mod security_cli;
mod serve;
mod transform_cli;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ketch",
    version,
    about = "Ketch: a durable, replicated event log over QUIC"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `ketch_broker=debug`. The
    /// default leaves out openraft's replication errors (one per retry of every group while
    /// a peer is down); the broker says once when a peer stops and starts answering.
    #[arg(
        long,
        env = "KETCH_LOG",
        default_value = "warn,ketch=info,ketch_broker=info,openraft::replication=off,openraft::engine::handler::replication_handler=off,openraft::core::heartbeat=off",
        global = true
    )]
    log: String,
    /// Log lines on stderr as human-readable text or as one JSON object per line (for log
    /// shippers).
    #[arg(
        long,
        env = "KETCH_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker.
    Serve(Box<serve::ServeArgs>),
    /// Create, list, describe and delete topics.
    Topic(cli::TopicArgs),
    /// Write one record per line of stdin.
    Produce(cli::ProduceArgs),
    /// Print records, one line each.
    Consume(cli::ConsumeArgs),
    /// List and describe consumer groups.
    Group(cli::GroupArgs),
    /// Deploy, list, describe and delete Wasm filters.
    Filter(filter_cli::FilterArgs),
    /// Topic-to-topic Wasm transforms run inside the broker.
    Transform(transform_cli::TransformArgs),
    /// Create, list and revoke API tokens.
    Token(security_cli::TokenArgs),
    /// Add, remove and list access rules.
    Acl(security_cli::AclArgs),
    /// Set and list per-principal byte-rate quotas.
    Quota(security_cli::QuotaArgs),
    /// The brokers of a cluster: state, partitions led, replica lag.
    Cluster(cluster_cli::ClusterArgs),
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Topic(args) => cli::topic(args),
        Command::Produce(args) => cli::produce(args),
        Command::Consume(args) => cli::consume(args),
        Command::Group(args) => cli::group(args),
        Command::Filter(args) => filter_cli::filter_command(args),
        Command::Transform(args) => transform_cli::transform_command(args),
        Command::Token(args) => security_cli::token(args),
        Command::Acl(args) => security_cli::acl(args),
        Command::Quota(args) => security_cli::quota(args),
        Command::Cluster(args) => cluster_cli::cluster(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn help(path: &[&str]) -> String {
        let mut command = Cli::command();
        command.build();
        let mut sub = &mut command;
        for name in path {
            sub = sub.find_subcommand_mut(name).expect("subcommand");
        }
        sub.render_long_help().to_string()
    }

    const CLIENT_FLAGS: [&str; 6] = [
        "--broker",
        "--ca-cert",
        "--server-name",
        "--token",
        "--client-cert",
        "--client-key",
    ];

    #[test]
    fn serve_help_has_no_client_flags_and_documents_every_default() {
        let text = help(&["serve"]);
        for flag in CLIENT_FLAGS {
            assert!(
                !text.contains(flag),
                "`ketch serve --help` shows {flag}:\n{text}"
            );
        }
        let serve = Cli::command();
        let serve = serve.find_subcommand("serve").expect("serve");
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if ["config", "help", "log", "log_format"].contains(&id) {
                continue;
            }
            let doc = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string());
            let doc = doc.unwrap_or_default();
            assert!(
                doc.contains("[default:"),
                "--{id} documents no default: {doc:?}"
            );
        }
    }

    #[test]
    fn client_commands_show_connection_flags() {
        for path in [
            &["topic", "create"][..],
            &["topic", "list"],
            &["produce"],
            &["consume"],
            &["group", "describe"],
            &["filter", "list"],
            &["token", "create"],
            &["acl", "add"],
            &["quota", "set"],
        ] {
            let text = help(path);
            for flag in CLIENT_FLAGS {
                assert!(text.contains(flag), "`ketch {path:?} --help` lacks {flag}");
            }
            assert!(
                !text.contains("--data-dir"),
                "`ketch {path:?} --help` shows --data-dir"
            );
        }
    }

    #[test]
    fn connection_flags_go_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "ketch",
            "topic",
            "create",
            "t",
            "--broker",
            "h:1",
            "--partitions",
            "3",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Topic(_)));
        assert!(Cli::try_parse_from(["ketch", "serve", "--broker", "h:1"]).is_err());
        let cli = Cli::try_parse_from(["ketch", "serve", "--log-format", "json"]).expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
    }
}
