//! The state rebuilt at start: every input partition re-read from its
//! beginning, or from the offsets of the snapshot the engine loaded, up to
//! the group's committed offset, its events applied in restore mode (state
//! only: their effects were published before).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::batch::{cap_future, Msg};
use super::stage::INPUT_TOPICS;
use super::{decode, Topic};
use crate::serve::config::Settings;

/// Events handed to `apply` at a time.
const CHUNK: usize = 50_000;

/// Per input partition `(topic, partition)`: an offset (the group's
/// committed one, or where a re-read starts).
pub type Ends = BTreeMap<(String, i32), i64>;

/// The group's committed offset of each input partition that has one.
pub fn committed(group: &StreamConsumer) -> Result<Ends> {
    let timeout = Duration::from_secs(30);
    let meta = group
        .fetch_metadata(None, timeout)
        .context("fetching Kafka metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        if INPUT_TOPICS.iter().any(|x| x.name() == t.name()) {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let mut ends = BTreeMap::new();
    if tpl.count() == 0 {
        return Ok(ends);
    }
    let committed = group
        .committed_offsets(tpl, timeout)
        .context("reading the group's committed offsets")?;
    for e in committed.elements() {
        if let Offset::Offset(c) = e.offset() {
            if c > 0 {
                ends.insert((e.topic().to_string(), e.partition()), c);
            }
        }
    }
    Ok(ends)
}

/// The partitions to re-read, from `from` (default: their beginning) up to
/// `ends`: those with messages in between, and their assignment.
fn to_read(group: &StreamConsumer, ends: &Ends, from: &Ends) -> Result<(Ends, TopicPartitionList)> {
    let timeout = Duration::from_secs(30);
    let mut todo = BTreeMap::new();
    let mut assign = TopicPartitionList::new();
    for ((topic, partition), &end) in ends {
        let start = from.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
        if start >= end {
            continue;
        }
        let (low, _) = group
            .fetch_watermarks(topic, *partition, timeout)
            .context("reading watermarks")?;
        if low >= end {
            continue;
        }
        if low > start {
            tracing::warn!(
                topic = %topic,
                partition,
                start,
                low,
                "the log no longer holds the messages from the restore's start (retention): re-reading from its beginning"
            );
        }
        todo.insert((topic.clone(), *partition), end);
        let offset = if start > low {
            Offset::Offset(start)
        } else {
            Offset::Beginning
        };
        assign.add_partition_offset(topic, *partition, offset)?;
    }
    Ok((todo, assign))
}

/// Re-reads every input partition of `group` from `from` (a snapshot's
/// offsets; a partition not in it: its beginning) up to `ends` (the group's
/// committed offsets, [`committed`]) and hands the accepted events to
/// `apply`, in order, in chunks. Returns the number of messages re-read.
/// Rejected messages were dead-lettered before the restart and are skipped.
pub fn restore(
    settings: &Settings,
    group: &StreamConsumer,
    ends: &Ends,
    from: &Ends,
    mut apply: impl FnMut(Vec<Msg>) -> Result<()>,
) -> Result<u64> {
    let (ends, assign) = to_read(group, ends, from)?;
    if ends.is_empty() {
        return Ok(0);
    }
    let reader: BaseConsumer = settings
        .kafka
        .client_config(&[
            ("group.id", &format!("{}-restore", settings.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
        ])
        .create()
        .context("creating the restore consumer")?;
    reader.assign(&assign)?;
    let limits = &settings.ingest.limits;
    let max_future_ms = settings.ingest.max_future_ms;
    let mut pending = ends.clone();
    let mut msgs = Vec::new();
    let mut n = 0u64;
    let mut quiet = Instant::now();
    while !pending.is_empty() {
        let m = match reader.poll(Duration::from_millis(200)) {
            None if quiet.elapsed() > Duration::from_secs(60) => anyhow::bail!(
                "restore stalled: partitions {:?} did not reach their committed offsets",
                pending.keys().collect::<Vec<_>>()
            ),
            None => continue,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "restore consumer error");
                continue;
            }
            Some(Ok(m)) => m,
        };
        quiet = Instant::now();
        let key = (m.topic().to_string(), m.partition());
        let Some(&end) = ends.get(&key) else { continue };
        if m.offset() >= end {
            pending.remove(&key);
            continue;
        }
        n += 1;
        if let Some(topic) = Topic::from_name(m.topic()) {
            if let Ok(mut event) = decode(topic, m.key(), m.payload().unwrap_or(&[]), limits) {
                // Capped as when it was first read (the same reference).
                cap_future(&mut event, m.timestamp().to_millis(), max_future_ms);
                msgs.push(Msg::new(event, None).at(m.partition()));
            }
        }
        if m.offset() + 1 >= end {
            pending.remove(&key);
        }
        if msgs.len() >= CHUNK {
            apply(std::mem::take(&mut msgs))?;
        }
    }
    apply(msgs)?;
    Ok(n)
}
