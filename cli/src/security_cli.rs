//! `ketch token create|list|revoke`, `ketch acl add|remove|list`, `ketch quota set|list`:
//! security administration over `ketch-client`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ketch_client::{Acl, Operation, Quota};

use crate::cli::{Connection, block_on};

/// `ketch token ...`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an API token; it is printed once, as the last word of the output.
    Create {
        /// Who the token authenticates as.
        #[arg(long)]
        principal: String,
        /// Lifetime: e.g. 90s, 30m, 12h, 7d, 500ms. [default: never expires]
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Every token (id, principal, state), never the secrets.
    List,
    /// Revoke a token by itself or by its id; connections using it fail their next request.
    Revoke {
        #[arg(value_name = "TOKEN_OR_ID")]
        token_or_id: String,
    },
}

/// `ketch acl ...`.
#[derive(Debug, Args)]
pub struct AclArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: AclCommand,
}

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Add a rule.
    Add(AclRule),
    /// Remove a rule (the same flags that added it).
    Remove(AclRule),
    /// Every rule, one per line.
    List,
}

/// One rule: `--principal P --allow|--deny OP` and one resource.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("permission").required(true).args(["allow", "deny"])))]
#[command(group(clap::ArgGroup::new("resource").required(true).args(
    ["topic", "topic_prefix", "group", "group_prefix", "filter", "transform", "cluster"]
)))]
pub struct AclRule {
    /// Who the rule is about; `*` is everyone (anonymous clients too).
    #[arg(long)]
    principal: String,
    /// Allow this operation: read, write, create, delete, describe, alter, deploy-filter, all.
    #[arg(long, value_name = "OP")]
    allow: Option<Operation>,
    /// Deny this operation (a deny wins over every allow).
    #[arg(long, value_name = "OP")]
    deny: Option<Operation>,
    /// A topic, by name.
    #[arg(long, value_name = "NAME")]
    topic: Option<String>,
    /// Every topic whose name starts with this.
    #[arg(long, value_name = "PREFIX")]
    topic_prefix: Option<String>,
    /// A consumer group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Every consumer group whose name starts with this.
    #[arg(long, value_name = "PREFIX")]
    group_prefix: Option<String>,
    /// A Wasm filter module (read: run it on a subscription; deploy-filter: upload it).
    #[arg(long, value_name = "FILTER")]
    filter: Option<String>,
    /// A transform.
    #[arg(long, value_name = "NAME")]
    transform: Option<String>,
    /// The broker itself (security administration; create: any topic).
    #[arg(long)]
    cluster: bool,
}

impl AclRule {
    fn acl(&self) -> Acl {
        let rule = match (self.allow, self.deny) {
            (Some(op), _) => Acl::allow(&self.principal, op),
            (None, Some(op)) => Acl::deny(&self.principal, op),
            (None, None) => unreachable!("clap requires --allow or --deny"),
        };
        if let Some(name) = &self.topic {
            rule.topic(name)
        } else if let Some(prefix) = &self.topic_prefix {
            rule.topic_prefix(prefix)
        } else if let Some(name) = &self.group {
            rule.group(name)
        } else if let Some(prefix) = &self.group_prefix {
            rule.group_prefix(prefix)
        } else if let Some(name) = &self.filter {
            rule.filter(name)
        } else if let Some(name) = &self.transform {
            rule.transform(name)
        } else {
            rule.cluster()
        }
    }
}

/// `ketch quota ...`.
#[derive(Debug, Args)]
pub struct QuotaArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: QuotaCommand,
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Set a principal's byte rates; 0 is no limit (both 0 removes the quota). Clients over
    /// their rate are slowed down, not refused.
    Set {
        #[arg(long)]
        principal: String,
        /// Bytes of record batches per second it may produce. 0 means no limit.
        #[arg(long, value_name = "N", default_value_t = 0)]
        produce_bytes_per_s: u64,
        /// Bytes of records per second it may fetch. 0 means no limit.
        #[arg(long, value_name = "N", default_value_t = 0)]
        fetch_bytes_per_s: u64,
    },
    /// Every quota.
    List,
}

/// `90s`, `30m`, `12h`, `7d`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?} (ms, s, m, h or d)")),
    };
    number
        .checked_mul(ms_per_unit)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} must be positive and not absurdly long"))
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| ms.to_string())
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        let admin = client.admin();
        match args.command {
            TokenCommand::Create {
                principal,
                expires_in,
            } => {
                let made = admin
                    .create_token(&principal, expires_in)
                    .await
                    .with_context(|| format!("creating a token for {principal}"))?;
                let expiry = match made.expires_at_ms {
                    Some(at) => format!("expires at {at} ms"),
                    None => "never expires".to_owned(),
                };
                println!(
                    "token {} for principal {} ({expiry}); it is shown only now:\n{}",
                    made.id, made.principal, made.token
                );
            }
            TokenCommand::List => {
                println!("ID\tPRINCIPAL\tCREATED_MS\tEXPIRES_MS\tREVOKED_MS");
                for t in admin.list_tokens().await? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        t.id,
                        t.principal,
                        t.created_at_ms,
                        when(t.expires_at_ms),
                        when(t.revoked_at_ms)
                    );
                }
            }
            TokenCommand::Revoke { token_or_id } => {
                let id = admin.revoke_token(&token_or_id).await?;
                println!("revoked token {id}");
            }
        }
        client.close();
        Ok(())
    })
}

pub fn acl(args: AclArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        let admin = client.admin();
        match args.command {
            AclCommand::Add(rule) => {
                let acl = rule.acl();
                let added = admin.add_acls(std::slice::from_ref(&acl)).await?;
                let note = if added == 0 { " (already there)" } else { "" };
                println!("added: {acl}{note}");
            }
            AclCommand::Remove(rule) => {
                let acl = rule.acl();
                if admin.remove_acls(std::slice::from_ref(&acl)).await? == 0 {
                    bail!("no such rule: {acl}");
                }
                println!("removed: {acl}");
            }
            AclCommand::List => {
                for acl in admin.list_acls().await? {
                    println!("{acl}");
                }
            }
        }
        client.close();
        Ok(())
    })
}

pub fn quota(args: QuotaArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = args.connection.connect().await?;
        let admin = client.admin();
        match args.command {
            QuotaCommand::Set {
                principal,
                produce_bytes_per_s,
                fetch_bytes_per_s,
            } => {
                let quota = Quota {
                    principal,
                    produce_bytes_per_s,
                    fetch_bytes_per_s,
                };
                admin.set_quota(&quota).await?;
                println!(
                    "quota of {}: produce {} bytes/s, fetch {} bytes/s (0: no limit)",
                    quota.principal, quota.produce_bytes_per_s, quota.fetch_bytes_per_s
                );
            }
            QuotaCommand::List => {
                println!("PRINCIPAL\tPRODUCE_BYTES_PER_S\tFETCH_BYTES_PER_S");
                for q in admin.list_quotas().await? {
                    println!(
                        "{}\t{}\t{}",
                        q.principal, q.produce_bytes_per_s, q.fetch_bytes_per_s
                    );
                }
            }
        }
        client.close();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let cases = [
            ("500ms", Ok(500)),
            ("90s", Ok(90_000)),
            ("30m", Ok(1_800_000)),
            ("12h", Ok(43_200_000)),
            ("7d", Ok(604_800_000)),
            ("0s", Err("positive")),
            ("10", Err("no unit")),
            ("h", Err("number")),
            ("5w", Err("unknown unit")),
        ];
        for (text, expected) in cases {
            match (parse_duration(text), expected) {
                (Ok(d), Ok(ms)) => assert_eq!(d.as_millis(), ms, "{text}"),
                (Err(e), Err(why)) => assert!(e.contains(why), "{text}: {e}"),
                (got, want) => panic!("{text}: {got:?} vs {want:?}"),
            }
        }
    }
}
