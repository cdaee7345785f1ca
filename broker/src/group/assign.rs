//! The target assignment: which member should own which partition once reconciliation is done.
//!
//! A pure function of the topics, the subscriptions and the previous target, so it is easy to
//! test and the coordinator stays deterministic. Per topic, the subscribers (in member id
//! order) split the partitions evenly: each gets `n / k`, and `n % k` of them one more. The
//! ones that get one more are those with the fewest partitions so far (from topics earlier in
//! name order, which balances many small topics across members), then those that already had
//! one more, then by member id. Each member keeps as many of its previous partitions of the
//! topic as its quota allows (the lowest numbered first); the partitions left over go to the
//! members below their quota. So a member joining takes partitions from others without
//! reshuffling the rest, and running the function on its own output changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::TopicPartition;

/// One member as the assignor sees it.
#[derive(Debug)]
pub(crate) struct AssignorMember<'a> {
    pub topics: &'a BTreeSet<String>,
    pub previous_target: &'a BTreeSet<TopicPartition>,
}

/// Targets for `members`, index for index. `topics` holds the partition counts of the topics
/// that exist; subscribed topics missing from it are ignored. Previous targets must be
/// disjoint (they are this function's earlier output).
pub(crate) fn assign(
    topics: &BTreeMap<String, u32>,
    members: &[AssignorMember<'_>],
) -> Vec<BTreeSet<TopicPartition>> {
    let mut targets = vec![BTreeSet::new(); members.len()];
    let mut totals = vec![0_u64; members.len()];
    for (topic, &partition_count) in topics {
        let subscribers: Vec<usize> = (0..members.len())
            .filter(|&index| members[index].topics.contains(topic))
            .collect();
        if subscribers.is_empty() || partition_count == 0 {
            continue;
        }
        let subscriber_count = u32::try_from(subscribers.len()).expect("members fit in u32");
        let base = partition_count / subscriber_count;
        let extra = (partition_count % subscriber_count) as usize;

        let previous: Vec<Vec<u32>> = subscribers
            .iter()
            .map(|&index| {
                previous_partitions(members[index].previous_target, topic, partition_count)
            })
            .collect();
        let mut ranked: Vec<usize> = (0..subscribers.len()).collect();
        ranked.sort_by_key(|&s| {
            (
                totals[subscribers[s]],
                previous[s].len() as u64 <= u64::from(base),
                s,
            )
        });
        let mut quotas = vec![base as usize; subscribers.len()];
        for &s in &ranked[..extra] {
            quotas[s] += 1;
        }

        let mut taken = vec![false; partition_count as usize];
        let mut assigned: Vec<Vec<u32>> = vec![Vec::new(); subscribers.len()];
        for s in 0..subscribers.len() {
            for &partition in previous[s].iter().take(quotas[s]) {
                assert!(
                    !taken[partition as usize],
                    "previous targets overlap on {topic}/{partition}"
                );
                taken[partition as usize] = true;
                assigned[s].push(partition);
            }
        }
        let mut free = (0..partition_count).filter(|&partition| !taken[partition as usize]);
        for s in 0..subscribers.len() {
            while assigned[s].len() < quotas[s] {
                assigned[s].push(free.next().expect("quotas add up to the partition count"));
            }
        }
        assert_eq!(free.next(), None, "quotas add up to the partition count");

        for (s, partitions) in assigned.into_iter().enumerate() {
            let index = subscribers[s];
            totals[index] += partitions.len() as u64;
            targets[index].extend(partitions.into_iter().map(|partition| TopicPartition {
                topic: topic.clone(),
                partition,
            }));
        }
    }
    targets
}

/// The partitions of `topic` below `partition_count` in `target`, ascending.
fn previous_partitions(
    target: &BTreeSet<TopicPartition>,
    topic: &str,
    partition_count: u32,
) -> Vec<u32> {
    let start = TopicPartition {
        topic: topic.to_owned(),
        partition: 0,
    };
    target
        .range(start..)
        .take_while(|tp| tp.topic == topic)
        .map(|tp| tp.partition)
        .take_while(|&partition| partition < partition_count)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, for reproducible random inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            crate::storage::sim::splitmix64(&mut self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn run(
        topics: &BTreeMap<String, u32>,
        subscriptions: &[BTreeSet<String>],
        previous: &[BTreeSet<TopicPartition>],
    ) -> Vec<BTreeSet<TopicPartition>> {
        let members: Vec<AssignorMember<'_>> = subscriptions
            .iter()
            .zip(previous)
            .map(|(topics, previous_target)| AssignorMember {
                topics,
                previous_target,
            })
            .collect();
        assign(topics, &members)
    }

    /// Every partition of a subscribed topic goes to exactly one subscriber, and the
    /// subscribers' shares of each topic differ by at most one.
    fn check_balanced(
        seed: u64,
        topics: &BTreeMap<String, u32>,
        subscriptions: &[BTreeSet<String>],
        targets: &[BTreeSet<TopicPartition>],
    ) {
        for (topic, &count) in topics {
            let subscribers: Vec<usize> = (0..subscriptions.len())
                .filter(|&m| subscriptions[m].contains(topic))
                .collect();
            let mut owners = vec![0; count as usize];
            for (m, target) in targets.iter().enumerate() {
                for tp in target.iter().filter(|tp| &tp.topic == topic) {
                    assert!(
                        subscribers.contains(&m),
                        "seed {seed}: {tp:?} given to non-subscriber {m}"
                    );
                    owners[tp.partition as usize] += 1;
                }
            }
            if subscribers.is_empty() {
                assert!(owners.iter().all(|&n| n == 0), "seed {seed}");
                continue;
            }
            assert!(
                owners.iter().all(|&n| n == 1),
                "seed {seed}: {topic} owners {owners:?}"
            );
            let shares: Vec<usize> = subscribers
                .iter()
                .map(|&m| targets[m].iter().filter(|tp| &tp.topic == topic).count())
                .collect();
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "seed {seed}: {topic} shares {shares:?}");
        }
    }

    #[test]
    fn random_inputs_are_balanced_complete_and_a_fixed_point() {
        for seed in 0..500 {
            let mut rng = Rng(seed);
            let topics: BTreeMap<String, u32> = (0..1 + rng.below(4))
                .map(|t| (format!("t{t}"), rng.below(13) as u32))
                .collect();
            let member_count = rng.below(7) as usize;
            let subscriptions: Vec<BTreeSet<String>> = (0..member_count)
                .map(|_| {
                    topics
                        .keys()
                        .filter(|_| rng.below(4) > 0)
                        .cloned()
                        .collect()
                })
                .collect();
            let empty = vec![BTreeSet::new(); member_count];
            let first = run(&topics, &subscriptions, &empty);
            check_balanced(seed, &topics, &subscriptions, &first);
            let second = run(&topics, &subscriptions, &first);
            assert_eq!(first, second, "seed {seed}: not a fixed point");
        }
    }

    #[test]
    fn single_partition_topics_spread_across_members() {
        let topics: BTreeMap<String, u32> = (0..9).map(|t| (format!("t{t}"), 1)).collect();
        let all: BTreeSet<String> = topics.keys().cloned().collect();
        let subscriptions = vec![all.clone(), all.clone(), all];
        let targets = run(&topics, &subscriptions, &vec![BTreeSet::new(); 3]);
        let counts: Vec<usize> = targets.iter().map(BTreeSet::len).collect();
        assert_eq!(counts, [3, 3, 3]);
    }

    #[test]
    fn a_member_joining_moves_only_what_balance_needs() {
        for (seed, partition_counts, members_before) in [
            (0, vec![6], 3),
            (1, vec![6, 6], 3),
            (2, vec![7, 5, 1], 2),
            (3, vec![12], 5),
        ] {
            let topics: BTreeMap<String, u32> = partition_counts
                .iter()
                .enumerate()
                .map(|(t, &n)| (format!("t{t}"), n))
                .collect();
            let all: BTreeSet<String> = topics.keys().cloned().collect();
            let before_subs = vec![all.clone(); members_before];
            let before = run(
                &topics,
                &before_subs,
                &vec![BTreeSet::new(); members_before],
            );
            let after_subs = vec![all; members_before + 1];
            let mut previous = before.clone();
            previous.push(BTreeSet::new());
            let after = run(&topics, &after_subs, &previous);
            check_balanced(seed, &topics, &after_subs, &after);
            // Moved partitions are exactly what the newcomer gets: nothing shuffles among
            // the members that were already there.
            let moved: usize = before
                .iter()
                .zip(&after)
                .map(|(old, new)| old.difference(new).count())
                .sum();
            assert_eq!(moved, after[members_before].len(), "case {seed}");
            let total: u32 = partition_counts.iter().sum();
            let fair_share = total as usize / (members_before + 1);
            assert!(
                after[members_before].len() >= fair_share,
                "case {seed}: {after:?}"
            );
        }
    }
}
