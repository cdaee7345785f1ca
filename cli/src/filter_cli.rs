//! `ketch filter deploy|list|describe|delete`: Wasm filter modules, over `ketch-client`.
//! (`ketch consume --filter` and `--filter-params` live with `consume` in `cli.rs`.)

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::cli::{Connection, block_on};

/// `ketch filter ...`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: FilterCommand,
}

#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Upload a module (`.wasm`); a new version is numbered unless its bytes are the latest's.
    Deploy {
        name: String,
        path: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every filter with its latest version.
    List,
    /// Every version of a filter, and where it is attached.
    Describe { name: String },
    /// Delete every version; refused while the filter is attached somewhere, unless --force.
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

pub fn filter_command(args: FilterArgs) -> anyhow::Result<()> {
    filter(&args.connection, args.command)
}

fn filter(connection: &Connection, command: FilterCommand) -> anyhow::Result<()> {
    block_on(async {
        let client = connection.connect().await?;
        let admin = client.admin();
        match command {
            FilterCommand::Deploy {
                name,
                path,
                description,
            } => {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let version = admin
                    .upload_filter(&name, &description, bytes)
                    .await
                    .with_context(|| format!("deploying {}", path.display()))?;
                println!(
                    "deployed {} v{} ({} bytes, sha256 {})",
                    version.name, version.version, version.module_bytes, version.digest
                );
            }
            FilterCommand::List => {
                for f in admin.list_filters().await? {
                    println!(
                        "{}\tv{}\t{} bytes\tsha256 {}\t{}",
                        f.name, f.version, f.module_bytes, f.digest, f.description
                    );
                }
            }
            FilterCommand::Describe { name } => {
                let d = admin.describe_filter(&name).await?;
                println!("filter {}", d.name);
                for v in &d.versions {
                    println!(
                        "  v{}\t{} bytes\tsha256 {}\t{}",
                        v.version, v.module_bytes, v.digest, v.description
                    );
                }
                if d.in_use_by.is_empty() {
                    println!("  not in use");
                } else {
                    println!("  in use by: {}", d.in_use_by.join(", "));
                }
            }
            FilterCommand::Delete { name, force } => {
                admin.delete_filter(&name, force).await?;
                println!("deleted {name}");
            }
        }
        client.close();
        Ok(())
    })
}
