//! The state rebuilt at start: every input partition re-read from its
//! beginning up to the group's committed offset, its events applied in
//! restore mode (state only: their effects were published before).

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

/// The committed offset of each partition to re-read: where the re-read ends.
type Ends = BTreeMap<(String, i32), i64>;

/// Per input partition with committed messages: the committed offset (the
/// end of the re-read) and the assignment that reads it from the beginning.
fn committed_ends(group: &StreamConsumer) -> Result<(Ends, TopicPartitionList)> {
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
    let mut assign = TopicPartitionList::new();
    if tpl.count() == 0 {
        return Ok((ends, assign));
    }
    let committed = group
        .committed_offsets(tpl, timeout)
        .context("reading the group's committed offsets")?;
    for e in committed.elements() {
        let Offset::Offset(c) = e.offset() else {
            continue;
        };
        if c <= 0 {
            continue;
        }
        let (low, _) = group
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .context("reading watermarks")?;
        if low < c {
            ends.insert((e.topic().to_string(), e.partition()), c);
            assign.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
        }
    }
    Ok((ends, assign))
}

/// Re-reads every input partition of `group` from its beginning up to the
/// group's committed offset and hands the accepted events to `apply`, in
/// order, in chunks. Returns the number of messages re-read. Rejected
/// messages were dead-lettered before the restart and are skipped.
pub fn restore(
    settings: &Settings,
    group: &StreamConsumer,
    mut apply: impl FnMut(Vec<Msg>) -> Result<()>,
) -> Result<u64> {
    let (ends, assign) = committed_ends(group)?;
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
                msgs.push(Msg::new(event, None));
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
