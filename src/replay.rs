//! A dataset as the three event streams (`thaw replay`).
//!
//! [`dataset_events`] orders a dataset's events in time: each item when it is
//! first seen (its first interaction anywhere in the data), the PKG edges of
//! an item right after both endpoints exist, and the interactions. With a
//! cold-start split, the meta-training interactions come first (phase 1,
//! merged with the item and edge events), then the scenario users' support
//! interactions (phase 2), so new items and new users really arrive
//! mid-stream; query interactions are never replayed, they are what
//! evaluation scores.
//!
//! The PKG edges are the ones evaluation's inference graph has
//! (`crate::train::pkg_build::build_pkg` over every item, co-interaction
//! relations from the training interactions), so the engine sees the graph
//! `thaw eval --model mpkg` scores with. Item categories are the KG labels of
//! `crate::train::features::item_categories`, hashed by the engine exactly
//! as in training.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::dataset::Dataset;
use crate::eval::split::Split;
use crate::ingest::{Event, InteractionEvent, ItemEvent, Kind, Limits, Op, RelationEvent};
use crate::kafka::KafkaSettings;
use crate::train::pkg_build::{build_pkg, PkgConfig};

fn ms(ds: &Dataset, index: usize) -> u64 {
    match ds.interactions[index].ts {
        Some(t) if t.is_finite() && t >= 0.0 => (t * 1000.0).round() as u64,
        _ => index as u64 * 1000,
    }
}

/// The events of `ds` in replay order (see the module documentation).
pub fn dataset_events(
    ds: &Dataset,
    split: Option<&Split>,
    pkg_cfg: &PkgConfig,
) -> Result<Vec<Event>> {
    let limits = Limits::default();
    let n_items = ds.n_items();
    // First (user, item) occurrence: value and time.
    let mut first: std::collections::HashMap<(u32, u32), usize> = Default::default();
    let mut item_first = vec![u64::MAX; n_items];
    let mut latest = 0u64;
    for (k, x) in ds.interactions.iter().enumerate() {
        first.entry((x.user, x.item)).or_insert(k);
        let t = ms(ds, k);
        item_first[x.item as usize] = item_first[x.item as usize].min(t);
        latest = latest.max(t);
    }
    for t in &mut item_first {
        if *t == u64::MAX {
            *t = latest;
        }
    }
    let interaction = |u: u32, i: u32| -> Event {
        let (value, ts) = match first.get(&(u, i)) {
            Some(&k) => (ds.interactions[k].value, ms(ds, k)),
            None => (None, item_first[i as usize]),
        };
        Event::Interaction(InteractionEvent {
            user_id: ds.users.id(u).to_string(),
            item_id: ds.items.id(i).to_string(),
            kind: if value.is_some() {
                Kind::Rating
            } else {
                Kind::View
            },
            value,
            ts,
        })
    };
    // Training interactions: meta-training plus support sets (as TrainSet).
    let mut user_items = vec![Vec::new(); ds.users.len()];
    type Pairs = Vec<(u32, u32)>;
    let (phase1, phase2): (Pairs, Pairs) = match split {
        None => {
            let mut seen = std::collections::HashSet::new();
            let v: Vec<(u32, u32)> = ds
                .interactions
                .iter()
                .map(|x| (x.user, x.item))
                .filter(|p| seen.insert(*p))
                .collect();
            (v, Vec::new())
        }
        Some(s) => {
            let p1 = s
                .meta_training
                .iter()
                .flat_map(|(u, its)| its.iter().map(move |&i| (*u, i)))
                .collect();
            let p2 = s
                .scenarios
                .values()
                .flatten()
                .flat_map(|t| t.support.iter().map(move |&i| (t.user, i)))
                .collect();
            (p1, p2)
        }
    };
    for &(u, i) in phase1.iter().chain(&phase2) {
        user_items[u as usize].push(i);
    }
    for its in &mut user_items {
        its.sort_unstable();
        its.dedup();
    }
    let all: Vec<u32> = (0..n_items as u32).collect();
    let (pkg, _) = build_pkg(ds, pkg_cfg, &all, &user_items).context("building the PKG")?;
    let categories = crate::train::features::item_categories(ds);

    // Phase 1: (ts, order, event); order 0 items, 1 edges, 2 interactions.
    let mut timeline: Vec<(u64, u8, String, Event)> = Vec::new();
    for i in 0..n_items {
        let mut cats: Vec<String> = categories[i]
            .iter()
            .filter(|c| c.len() <= limits.max_category_bytes)
            .cloned()
            .collect();
        cats.truncate(limits.max_categories);
        let id = ds.items.id(i as u32).to_string();
        timeline.push((
            item_first[i],
            0,
            id.clone(),
            Event::Item(ItemEvent {
                item_id: id,
                title: ds.item_text[i].clone(),
                description: None,
                categories: cats,
                features: None,
                ts: item_first[i],
            }),
        ));
    }
    for (r, name) in pkg.relations().iter().enumerate() {
        for (u, v) in pkg.edges(r)? {
            let (a, b) = (
                pkg.ext_id(u).unwrap_or_default(),
                pkg.ext_id(v).unwrap_or_default(),
            );
            let ta = ds.items.get(a).map_or(latest, |i| item_first[i as usize]);
            let tb = ds.items.get(b).map_or(latest, |i| item_first[i as usize]);
            let ts = ta.max(tb);
            timeline.push((
                ts,
                1,
                format!("{a}|{name}|{b}"),
                Event::Relation(RelationEvent {
                    src: a.to_string(),
                    dst: b.to_string(),
                    relation: name.clone(),
                    op: Op::Add,
                    ts,
                }),
            ));
        }
    }
    let sort_pairs = |pairs: Vec<(u32, u32)>| -> Vec<(u64, u8, String, Event)> {
        let mut v: Vec<(u64, u8, String, Event)> = pairs
            .into_iter()
            .map(|(u, i)| {
                let e = interaction(u, i);
                (
                    e.ts(),
                    2,
                    format!("{}|{}", ds.users.id(u), ds.items.id(i)),
                    e,
                )
            })
            .collect();
        v.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        v
    };
    timeline.extend(sort_pairs(phase1));
    timeline.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
    timeline.extend(sort_pairs(phase2));
    let mut out = Vec::with_capacity(timeline.len());
    let mut invalid = 0usize;
    for (_, _, _, e) in timeline {
        if e.validate(&limits).is_ok() {
            out.push(e);
        } else {
            invalid += 1;
        }
    }
    if invalid > 0 {
        tracing::warn!(
            invalid,
            "dataset events that do not pass validation were skipped"
        );
    }
    Ok(out)
}

fn check(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, m))) => {
            use rdkafka::Message;
            anyhow::bail!("delivering to {}: {err}", m.topic())
        }
        Err(_) => anyhow::bail!("the producer was dropped before delivery"),
    }
}

/// What [`produce`] sent.
#[derive(Debug, Clone, Default)]
pub struct ReplayStats {
    /// Events sent.
    pub events: usize,
    /// Item events.
    pub items: usize,
    /// Relation events.
    pub relations: usize,
    /// Interaction events.
    pub interactions: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Produces `events` in order (per key, Kafka keeps the order), at most
/// `rate` per second when given; waits for every delivery.
pub async fn produce(
    events: &[Event],
    kafka: &KafkaSettings,
    rate: Option<f64>,
) -> Result<ReplayStats> {
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .context("creating the Kafka producer")?;
    let t0 = Instant::now();
    let mut stats = ReplayStats::default();
    let mut inflight = FuturesUnordered::new();
    for (k, e) in events.iter().enumerate() {
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            let due = Duration::from_secs_f64(k as f64 / r);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let payload = e.encode()?;
        let key = e.key();
        let topic = e.topic().name();
        loop {
            let rec = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(&payload);
            match producer.send_result(rec) {
                Ok(delivery) => {
                    inflight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match inflight.next().await {
                        Some(r) => check(r)?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((err, _)) => anyhow::bail!("producing to {topic}: {err}"),
            }
        }
        match e {
            Event::Item(_) => stats.items += 1,
            Event::Relation(_) => stats.relations += 1,
            Event::Interaction(_) => stats.interactions += 1,
        }
        while inflight.len() >= 10_000 {
            if let Some(r) = inflight.next().await {
                check(r)?;
            }
        }
    }
    while let Some(r) = inflight.next().await {
        check(r)?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    stats.events = events.len();
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}
