//! `ketch transform create|list|describe|pause|resume|delete`: topic-to-topic Wasm transforms
//! run inside the broker, over `ketch-client`.

use clap::{Args, Subcommand};
use ketch_client::{NewTransform, TransformStart, TransformStatus};

use crate::cli::{Connection, block_on};

/// `ketch transform ...`.
#[derive(Debug, Args)]
pub struct TransformArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TransformCommand,
}

#[derive(Debug, Subcommand)]
pub enum TransformCommand {
    /// Create and start a transform: read --input, run --filter on every batch, write what it
    /// keeps or emits to the --output topics (routed records to their topic, the others to the
    /// first output).
    Create {
        name: String,
        /// The deployed filter (pinned at its latest version).
        #[arg(long)]
        filter: String,
        /// The topic read.
        #[arg(long)]
        input: String,
        /// The topics written, comma-separated.
        #[arg(
            long,
            value_name = "T2[,T3...]",
            value_delimiter = ',',
            required = true
        )]
        output: Vec<String>,
        /// Where reading starts: beginning, end (only new records) or an offset.
        #[arg(long, default_value = "beginning", value_name = "beginning|end|OFFSET")]
        from: TransformStart,
        /// JSON text the filter gets at init.
        #[arg(long, default_value = "")]
        params: String,
    },
    /// Every transform with its status.
    List,
    /// A transform's status, counts, lag and last error.
    Describe { name: String },
    /// Stop a transform where it is (its position is kept).
    Pause { name: String },
    /// Start a paused or failed transform again from its committed position.
    Resume { name: String },
    /// Stop and remove a transform (its outputs stay).
    Delete { name: String },
}

fn print_status(t: &TransformStatus) {
    println!(
        "{}\t{}\tfilter {} v{}\t{} -> {}\tin {}\tout {}\tlag {}",
        t.name,
        t.status,
        t.filter,
        t.filter_version,
        t.input,
        t.outputs.join(","),
        t.records_in,
        t.records_out,
        t.lag
    );
    if !t.last_error.is_empty() {
        println!("  last error: {}", t.last_error);
    }
}

pub fn transform_command(args: TransformArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        let admin = client.admin();
        match args.command {
            TransformCommand::Create {
                name,
                filter,
                input,
                output,
                from,
                params,
            } => {
                let status = admin
                    .create_transform(&NewTransform {
                        name,
                        filter,
                        input,
                        outputs: output,
                        from,
                        params,
                    })
                    .await?;
                print_status(&status);
            }
            TransformCommand::List => {
                for t in admin.list_transforms().await? {
                    print_status(&t);
                }
            }
            TransformCommand::Describe { name } => {
                let t = admin.describe_transform(&name).await?;
                print_status(&t);
                if !t.params.is_empty() {
                    println!("  params: {}", t.params);
                }
            }
            TransformCommand::Pause { name } => {
                admin.pause_transform(&name).await?;
                println!("paused {name}");
            }
            TransformCommand::Resume { name } => {
                admin.resume_transform(&name).await?;
                println!("resumed {name}");
            }
            TransformCommand::Delete { name } => {
                admin.delete_transform(&name).await?;
                println!("deleted {name}");
            }
        }
        client.close();
        Ok(())
    })
}
