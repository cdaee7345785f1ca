//! `ketch cluster status` (the brokers of a cluster as they answer now) and the cluster
//! administration commands: `transfer-leader`, `reassign`, `add-broker`.

use clap::{Args, Subcommand};

use crate::cli::{Connection, block_on};

/// `ketch cluster ...`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every broker: reachable or not, partitions it leads, replicas it hosts and how many
    /// records they are behind their leaders (asked of each broker at once).
    Status,
    /// Moves a partition's leadership to BROKER, one of its caught-up replicas
    /// (`__cluster_metadata 0 BROKER` moves the controller).
    TransferLeader {
        topic: String,
        partition: u32,
        /// The node id of the new leader.
        #[arg(value_name = "BROKER")]
        new_leader: u32,
    },
    /// Changes a partition's replicas to the brokers listed (node ids, comma-separated, the
    /// first the preferred leader), e.g. `ketch cluster reassign events 0 1,2,4`. New
    /// replicas copy the log before they vote; replicas left out delete theirs. Keep at
    /// least one current replica (move in steps). `__cluster_metadata 0 VOTERS` changes the
    /// controller quorum (brokers left out keep receiving the metadata).
    Reassign {
        topic: String,
        partition: u32,
        #[arg(
            value_name = "BROKER[,BROKER...]",
            value_delimiter = ',',
            required = true
        )]
        replicas: Vec<u32>,
    },
    /// Registers a broker started after the cluster (`ketch serve --node-id N --listen
    /// HOST:PORT --peers <the existing brokers> --ca-dir DIR`), given as `ID@HOST:PORT`: it
    /// receives the cluster metadata and can be given replicas (`reassign`).
    AddBroker {
        #[arg(value_name = "ID@HOST:PORT")]
        new_broker: String,
    },
}

pub fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        match args.command {
            ClusterCommand::Status => {
                let status = client.admin().cluster_status().await?;
                let controller = status.controller.map_or("-".to_owned(), |c| c.to_string());
                println!("controller {controller}");
                println!("NODE\tADDRESS\tSTATE\tLEADS\tREPLICAS\tLAG");
                for b in &status.brokers {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        b.node_id,
                        b.addr,
                        if b.reachable { "up" } else { "unreachable" },
                        b.partitions_led,
                        b.replicas,
                        b.lag_records
                    );
                }
            }
            ClusterCommand::TransferLeader {
                topic,
                partition,
                new_leader,
            } => {
                let moved = client
                    .admin()
                    .transfer_leader(&topic, partition, new_leader)
                    .await?;
                println!(
                    "{topic}/{partition}: leader {} (epoch {})",
                    moved.leader, moved.leader_epoch
                );
            }
            ClusterCommand::Reassign {
                topic,
                partition,
                replicas,
            } => {
                let now = client
                    .admin()
                    .reassign_partition(&topic, partition, &replicas)
                    .await?;
                let now: Vec<String> = now.iter().map(u32::to_string).collect();
                println!("{topic}/{partition}: replicas {}", now.join(","));
            }
            ClusterCommand::AddBroker { new_broker } => {
                let (id, address) = new_broker
                    .split_once('@')
                    .ok_or_else(|| anyhow::anyhow!("{new_broker:?} is not ID@HOST:PORT"))?;
                let id: u32 = id
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{new_broker:?}: {id:?} is not a node id"))?;
                client.admin().add_broker(id, address).await?;
                println!("added broker {id} at {address}");
            }
        }
        client.close();
        anyhow::Ok(())
    })
}
