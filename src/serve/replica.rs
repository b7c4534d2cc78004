//! Scale-out: N replicas share the work (DESIGN.md, "Scaling out").
//!
//! Every replica holds the whole graph, and here that means more than the
//! catalogue: the behavioural relations (`co_interacted`, `co_liked`), the
//! items' interaction counts and the fresh-item term are learnt from *all*
//! interactions, so a replica that saw only its own users' would hold
//! another graph, and publish other item embeddings, than one instance
//! does. So every replica reads all three topics in full, in a consumer
//! group of its own (`{group_id}.{replica_id}`, its own offsets and
//! restore), and the expensive per-user work is what is split: adaptation,
//! top-K and the Redis writes of a user are done by the one replica that
//! `group_id` assigns the user's `interactions` partition to.
//!
//! That assignment comes from a second consumer, [`Membership`]: it joins
//! `group_id`, subscribes to `interactions` and pauses whatever it is
//! assigned, so it reads nothing and only holds its share. Kafka's group
//! protocol is the coordination; thaw adds none of its own:
//! - a replica publishes the users whose latest interaction came through a
//!   partition it owns ([`Ownership::owns`]);
//! - the owner of partition 0 leads: it publishes the item embeddings;
//! - the core decides by its own view of the share, which changes only when
//!   it publishes what it gained: a rebalance that revokes and gives back
//!   the same partitions between two batches drops nothing;
//! - on a rebalance the core publishes every user of the partitions gained
//!   (and every item, when it gains the lead) from its own state, which is
//!   complete because it read everything: nothing is restored or lost, and
//!   a replica killed mid-stream is replaced by the others' next rebalance
//!   (`session.timeout.ms`);
//! - a model version is flipped when every share of it is written: each
//!   replica adds its shares (`p{n}` per partition, `items` for the leader)
//!   to `{root}:shares` after writing them, and whichever completes the set
//!   flips `{prefix}:model` ([`crate::publish::Publisher::flip`]);
//! - a replica joins the group only once it has caught up with its input
//!   (its first idle refresh), so a restarted one does not take its share
//!   back while its state is behind the others'.
//!
//! The price is memory and ingest: every replica holds every user's history
//! and reads every event (the graph work is not split). What scales is the
//! user work and the Redis writes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::Progress;
use crate::ingest::Topic;
use crate::kafka::KafkaSettings;

/// The `interactions` partitions this replica publishes the users of.
#[derive(Debug, Default)]
pub struct Ownership {
    owned: Mutex<BTreeSet<i32>>,
    generation: AtomicU64,
    partitions: AtomicI32,
}

impl Ownership {
    /// Whether the users of `partition` are this replica's.
    pub fn owns(&self, partition: i32) -> bool {
        self.lock().contains(&partition)
    }

    /// Whether this replica publishes the items and the model marker.
    pub fn leads(&self) -> bool {
        self.owns(0)
    }

    /// The partitions owned now.
    pub fn owned(&self) -> BTreeSet<i32> {
        self.lock().clone()
    }

    /// Bumped at every change of [`Ownership::owned`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// How many partitions `interactions` has (0 until known).
    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::SeqCst)
    }

    /// Every share of a version: one per partition and the items.
    pub fn all_shares(&self) -> usize {
        self.partitions().max(0) as usize + 1
    }

    /// Records a new assignment; whether it changed.
    pub fn set(&self, owned: BTreeSet<i32>) -> bool {
        let mut cur = self.lock();
        if *cur == owned {
            return false;
        }
        *cur = owned;
        self.generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The group member that holds this replica's share of `interactions`.
pub struct Membership {
    thread: std::thread::JoinHandle<()>,
    done: Arc<AtomicBool>,
}

/// How long a replica that has not caught up with its input (no idle
/// refresh yet) waits before it takes a share anyway.
const JOIN_AFTER: Duration = Duration::from_secs(120);

impl Membership {
    /// Joins `kafka.group_id` on `interactions` (from a thread of its own)
    /// once the engine caught up with its input (`progress.caught_up`, or
    /// after [`JOIN_AFTER`]: a restarted replica does not take a share back
    /// while its state is behind the others'), and keeps `ownership` up to
    /// date until `stop` or [`Membership::leave`]. Until the group's first
    /// assignment (seconds after joining) this replica publishes no user.
    pub fn start(
        kafka: &KafkaSettings,
        ownership: Arc<Ownership>,
        metrics: Arc<Metrics>,
        progress: Arc<Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self> {
        let consumer: BaseConsumer = kafka
            .client_config(&[
                ("group.id", kafka.group_id.as_str()),
                ("client.id", &format!("thaw-{}", kafka.replica_id)),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                // It reads nothing: whatever it fetches before a pause
                // takes effect is dropped, so keep that small.
                ("queued.max.messages.kbytes", "1024"),
                ("fetch.max.bytes", "1048576"),
            ])
            .create()
            .context("creating the group membership consumer")?;
        let topic = Topic::Interactions.name();
        let meta = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .context("reading the interactions topic's metadata")?;
        let n = meta
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len() as i32);
        anyhow::ensure!(n > 0, "the topic {topic} has no partitions");
        ownership.partitions.store(n, Ordering::SeqCst);
        let replica = kafka.replica_id.clone();
        let done = Arc::new(AtomicBool::new(false));
        let quit = {
            let done = done.clone();
            move || *stop.borrow() || done.load(Ordering::SeqCst)
        };
        let thread = std::thread::Builder::new()
            .name("thaw-membership".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                while !progress.caught_up.load(Ordering::SeqCst) && t0.elapsed() < JOIN_AFTER {
                    if quit() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Err(e) = consumer.subscribe(&[topic]) {
                    tracing::error!(error = %e, "joining the replicas' group failed: this replica publishes no user");
                    return;
                }
                tracing::info!(replica, caught_up = progress.caught_up.load(Ordering::SeqCst), "joined the replicas' group");
                hold(&consumer, &ownership, &metrics, &replica, &quit);
                // Leaving the group at once lets the others take the share
                // now, not after the session times out.
                consumer.unsubscribe();
                ownership.set(BTreeSet::new());
            })
            .context("starting the membership thread")?;
        Ok(Self { thread, done })
    }

    /// Leaves the group (also when the engine stopped on an error, without
    /// `stop`) and waits for the thread.
    pub fn leave(self) {
        self.done.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// Polls (reading nothing: whatever is assigned is paused) so that the
/// group keeps the member, and mirrors the assignment into `own`.
fn hold(
    consumer: &BaseConsumer,
    own: &Ownership,
    metrics: &Metrics,
    replica: &str,
    quit: &dyn Fn() -> bool,
) {
    while !quit() {
        let _ = consumer.poll(Duration::from_millis(100));
        let Ok(assignment) = consumer.assignment() else {
            continue;
        };
        // Paused at every turn: a revocation and reassignment of the same
        // partitions between two polls would leave them fetching.
        if assignment.count() > 0 {
            let mut pause = TopicPartitionList::new();
            for e in assignment.elements() {
                pause.add_partition(e.topic(), e.partition());
            }
            if let Err(e) = consumer.pause(&pause) {
                tracing::warn!(error = %e, "pausing the membership consumer");
            }
        }
        let owned: BTreeSet<i32> = assignment
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        if owned == own.owned() {
            continue;
        }
        tracing::info!(replica, partitions = ?owned, leader = owned.contains(&0), "replica share changed");
        metrics.set_replica(owned.len(), owned.contains(&0));
        own.set(owned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_assignment() {
        let o = Ownership::default();
        o.partitions.store(4, Ordering::SeqCst);
        assert!(!o.leads());
        assert!(o.set([0, 2].into()));
        assert!(!o.set([0, 2].into()), "no change, no new generation");
        assert_eq!(o.generation(), 1);
        assert!(o.leads() && o.owns(2) && !o.owns(1));
        assert_eq!(o.all_shares(), 5);
        o.set([3].into());
        assert_eq!((o.generation(), o.leads()), (2, false));
    }
}
