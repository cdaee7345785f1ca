//! `ketch`: the broker (`ketch serve`) and the command-line client.

mod cli;
mod filter_cli;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ketch",
    version,
    about = "Ketch: a durable, replicated event log over QUIC"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `ketch_broker=debug`.
    #[arg(
        long,
        env = "KETCH_LOG",
        default_value = "warn,ketch=info,ketch_broker=info",
        global = true
    )]
    log: String,
    #[command(flatten)]
    connection: cli::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker.
    Serve(serve::ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(cli::TopicCommand),
    /// Write one record per line of stdin.
    Produce(cli::ProduceArgs),
    /// Print records, one line each.
    Consume(cli::ConsumeArgs),
    /// List and describe consumer groups.
    #[command(subcommand)]
    Group(cli::GroupCommand),
    /// Deploy, list, describe and delete Wasm filters.
    #[command(subcommand)]
    Filter(filter_cli::FilterCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Topic(command) => cli::topic(&cli.connection, command),
        Command::Produce(args) => cli::produce(&cli.connection, args),
        Command::Consume(args) => cli::consume(&cli.connection, args),
        Command::Group(command) => cli::group(&cli.connection, command),
        Command::Filter(command) => filter_cli::filter(&cli.connection, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
