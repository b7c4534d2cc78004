//! A dataset as the three event streams (`thaw replay`).
//!
//! [`dataset_events`] orders a dataset's events in time: each item when it is
//! first seen (its first interaction anywhere in the data; an item nobody
//! interacted with, at the latest time of the data), each PKG edge right
//! after the later of its two items, and the interactions. With a cold-start
//! split, the meta-training interactions come first (phase 1, merged with the
//! item and edge events), then the scenario users' support interactions
//! (phase 2), so new items and new users really arrive mid-stream; query
//! interactions are never replayed, they are what evaluation scores.
//! [`dataset_timeline`] gives the same events with the phase boundary.
//!
//! The catalogue edges are the KG relations of evaluation's inference graph
//! (`crate::train::pkg_build::build_pkg` over every item). The behavioural
//! relations (`co_interacted`, `co_liked`) are never sent: the engine derives
//! them from each interaction as it consumes it, with the code that builds
//! them offline over the same interactions in the same order
//! (`crate::train::pkg_build::split_stream`), so the engine ends with the
//! graph `thaw eval --model mpkg` scores with, and never knows an interaction
//! before it arrives. Item categories are the KG labels of
//! `crate::train::features::item_categories`, hashed by the engine exactly
//! as in training.
//!
//! [`produce`] sends events to Kafka with their topic's key (`streams/`),
//! optionally paced, and waits for every delivery report.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::dataset::Dataset;
use crate::eval::split::Split;
use crate::ingest::{Event, InteractionEvent, ItemEvent, Kind, Limits, Op, RelationEvent};
use crate::kafka::KafkaSettings;
use crate::train::pkg_build::{
    build_pkg, relation_names, stream_order, PairTimes, PkgConfig, BEHAVIOURAL,
};

/// Most deliveries [`produce`] keeps in flight before it waits for reports.
const MAX_IN_FLIGHT: usize = 10_000;

/// A dataset's events in replay order, with the boundary between the phases.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// The events: phase 1 (`events[..history]`: every item, every PKG edge,
    /// and the meta-training interactions, or every interaction without a
    /// split), then phase 2 (`events[history..]`: the scenario users' support
    /// interactions).
    pub events: Vec<Event>,
    /// Number of phase-1 events.
    pub history: usize,
    /// Events left out because they do not pass
    /// [`Event::validate`] with [`Limits::default`] or encode to more than
    /// its `max_message_bytes`.
    pub skipped: usize,
}

/// Order of the timeline: `(ts, class, a, sub, b, c)`. Class 0 is the
/// catalogue: an item is `(ts, 0, item, 0, 0, 0)` and an edge
/// `(ts, 0, later item, 1, relation, other item)`, so an edge comes right
/// after the later of its items. Class 1 is an interaction,
/// `(ts, 1, user, 0, item, 0)`: after the catalogue events of its time.
type Key = (u64, u8, u32, u8, u32, u32);

/// Checks that a split names only users and items of `ds` (a split read with
/// [`Split::read`] always does; one built in memory might not).
fn check_split(ds: &Dataset, split: &Split) -> Result<()> {
    let (n_users, n_items) = (ds.users.len(), ds.n_items());
    let users = split.meta_training.iter().map(|(u, its)| (*u, its)).chain(
        split
            .scenarios
            .values()
            .flatten()
            .flat_map(|t| [(t.user, &t.support), (t.user, &t.query)]),
    );
    for (u, its) in users {
        if u as usize >= n_users {
            bail!("the split names user index {u}, the dataset has {n_users} users");
        }
        if let Some(i) = its.iter().find(|&&i| i as usize >= n_items) {
            bail!("the split names item index {i}, the dataset has {n_items} items");
        }
    }
    Ok(())
}

/// Distinct pairs in first-seen order, leaving out those in `seen` (and
/// adding the kept ones to it).
fn distinct(
    pairs: impl Iterator<Item = (u32, u32)>,
    seen: &mut HashSet<(u32, u32)>,
) -> Vec<(u32, u32)> {
    pairs.filter(|p| seen.insert(*p)).collect()
}

/// The events of `ds` in replay order (see the module documentation), with
/// the phase boundary and the number of events left out as invalid.
///
/// Deterministic: the same dataset, split and settings give the same events.
/// Each (user, item) pair is replayed at most once, with the time and value
/// of its first occurrence in the dataset: kind `rating` with the value when
/// the dataset has one, else `view`.
pub fn dataset_timeline(
    ds: &Dataset,
    split: Option<&Split>,
    pkg_cfg: &PkgConfig,
) -> Result<Timeline> {
    let limits = Limits::default();
    let n_items = ds.n_items();
    let times = PairTimes::new(ds);
    let item_ts: Vec<u64> = (0..n_items as u32).map(|i| times.item(i)).collect();

    // The phases, and the training interactions in stream order, from which
    // the PKG's catalogue relations are built (its behavioural relations are
    // the engine's to derive as it consumes the interactions).
    let mut seen = HashSet::new();
    let (phase1, phase2, stream) = match split {
        None => {
            let pairs = distinct(ds.interactions.iter().map(|x| (x.user, x.item)), &mut seen);
            let mut user_items = vec![Vec::new(); ds.users.len()];
            for &(u, i) in &pairs {
                user_items[u as usize].push(i);
            }
            for its in &mut user_items {
                its.sort_unstable();
                its.dedup();
            }
            let stream = stream_order(ds, &[&user_items]);
            (pairs, Vec::new(), stream)
        }
        Some(s) => {
            check_split(ds, s)?;
            let p1 = distinct(
                s.meta_training
                    .iter()
                    .flat_map(|(u, its)| its.iter().map(move |&i| (*u, i))),
                &mut seen,
            );
            let p2 = distinct(
                s.scenarios
                    .values()
                    .flatten()
                    .flat_map(|t| t.support.iter().map(move |&i| (t.user, i))),
                &mut seen,
            );
            (p1, p2, crate::train::pkg_build::split_stream(ds, s))
        }
    };

    let mut skipped = 0usize;
    let interaction = |u: u32, i: u32| -> Option<(Key, Event)> {
        // A split pair the dataset lacks: no value, when its item appears.
        let value = times.first(u, i).and_then(|k| ds.interactions[k].value);
        let ts = times.time(u, i)?;
        let e = Event::Interaction(InteractionEvent {
            user_id: ds.users.id(u).to_string(),
            item_id: ds.items.id(i).to_string(),
            kind: if ds.rated && value.is_some() {
                Kind::Rating
            } else {
                Kind::View
            },
            value,
            ts,
        });
        Some(((ts, 1, u, 0, i, 0), e))
    };

    // Phase 1: items, edges, and the phase-1 interactions, merged in time.
    let mut timeline: Vec<(Key, Event)> = Vec::new();
    let categories = crate::train::features::item_categories(ds);
    for (i, cats) in categories.into_iter().enumerate() {
        let mut cats: Vec<String> = cats
            .into_iter()
            .filter(|c| !c.is_empty() && c.len() <= limits.max_category_bytes)
            .collect();
        cats.truncate(limits.max_categories);
        let ts = item_ts[i];
        timeline.push((
            (ts, 0, i as u32, 0, 0, 0),
            Event::Item(ItemEvent {
                item_id: ds.items.id(i as u32).to_string(),
                title: ds.item_text[i].clone(),
                description: None,
                categories: cats,
                features: None,
                ts,
            }),
        ));
    }
    let all: Vec<u32> = (0..n_items as u32).collect();
    let (pkg, slots) = build_pkg(ds, pkg_cfg, &all, &stream).context("building the PKG")?;
    let mut item_of_slot = vec![u32::MAX; pkg.slots()];
    for (&item, &slot) in &slots {
        item_of_slot[slot as usize] = item;
    }
    for (r, name) in pkg.relations().iter().enumerate() {
        if BEHAVIOURAL.contains(&name.as_str()) {
            continue;
        }
        for (a, b) in pkg.edges(r)? {
            let (x, y) = (item_of_slot[a as usize], item_of_slot[b as usize]);
            if x == u32::MAX || y == u32::MAX {
                bail!("PKG edge ({a}, {b}) of {name} names a slot without an item");
            }
            let (tx, ty) = (item_ts[x as usize], item_ts[y as usize]);
            let (later, other) = if (tx, x) >= (ty, y) { (x, y) } else { (y, x) };
            let ts = tx.max(ty);
            timeline.push((
                (ts, 0, later, 1, r as u32, other),
                Event::Relation(RelationEvent {
                    src: ds.items.id(x).to_string(),
                    dst: ds.items.id(y).to_string(),
                    relation: name.clone(),
                    op: Op::Add,
                    ts,
                }),
            ));
        }
    }
    for (u, i) in phase1 {
        match interaction(u, i) {
            Some(x) => timeline.push(x),
            None => skipped += 1,
        }
    }
    timeline.sort_unstable_by_key(|(k, _)| *k);
    let mut live: Vec<(Key, Event)> = Vec::with_capacity(phase2.len());
    for (u, i) in phase2 {
        match interaction(u, i) {
            Some(x) => live.push(x),
            None => skipped += 1,
        }
    }
    live.sort_unstable_by_key(|(k, _)| *k);

    // Only events the engine accepts.
    let mut first_reason: Option<String> = None;
    let mut accept = |e: &Event| -> bool {
        let reason = match e.validate(&limits) {
            Err(r) => Some(r.to_string()),
            Ok(()) => match e.encode() {
                Ok(b) if b.len() <= limits.max_message_bytes => None,
                Ok(b) => Some(format!(
                    "oversized: {} bytes > {}",
                    b.len(),
                    limits.max_message_bytes
                )),
                Err(err) => Some(format!("encoding: {err}")),
            },
        };
        if let Some(r) = reason {
            first_reason.get_or_insert_with(|| format!("{} {:?}: {r}", e.topic().name(), e.key()));
            return false;
        }
        true
    };
    let mut events = Vec::with_capacity(timeline.len() + live.len());
    for (_, e) in timeline {
        if accept(&e) {
            events.push(e);
        } else {
            skipped += 1;
        }
    }
    let history = events.len();
    for (_, e) in live {
        if accept(&e) {
            events.push(e);
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            first = first_reason
                .as_deref()
                .unwrap_or("a timestamp out of range"),
            "dataset events the streams would refuse were left out of the replay"
        );
    }
    Ok(Timeline {
        events,
        history,
        skipped,
    })
}

/// The events of `ds` in replay order (see the module documentation):
/// [`dataset_timeline`]'s events.
pub fn dataset_events(
    ds: &Dataset,
    split: Option<&Split>,
    pkg_cfg: &PkgConfig,
) -> Result<Vec<Event>> {
    Ok(dataset_timeline(ds, split, pkg_cfg)?.events)
}

/// The PKG settings a model folder was trained with (`model.json`'s
/// `config.pkg`), after checking that they give `ds` the model's relations
/// (`relations`, in order): a replay for a model must carry the relations it
/// was trained on.
pub fn model_pkg_config(ds: &Dataset, model_dir: &Path) -> Result<PkgConfig> {
    let p = model_dir.join("model.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let card: crate::train::ModelCard =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    let built = relation_names(ds, &card.config.pkg);
    if built != card.relations {
        bail!(
            "{}: the model was trained with relations {:?}, its PKG settings give dataset {} relations {:?}: another dataset?",
            p.display(),
            card.relations,
            ds.name,
            built
        );
    }
    Ok(card.config.pkg)
}

/// What [`produce`] sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayStats {
    /// Events sent (and delivered).
    pub events: usize,
    /// Item events (topic `items`).
    pub items: usize,
    /// Relation events (topic `item-relations`).
    pub relations: usize,
    /// Interaction events (topic `interactions`).
    pub interactions: usize,
    /// Wall time from the first send to the flush, seconds.
    pub seconds: f64,
}

/// Turns a delivery report into an error naming the record when it failed.
fn check_delivery(
    r: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Result<()> {
    use rdkafka::Message;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, m))) => {
            let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
            bail!(
                "delivery failed: topic {}, partition {}, offset {}, key {key:?}: {err}",
                m.topic(),
                m.partition(),
                m.offset()
            )
        }
        Err(_) => bail!("delivery failed: the producer was dropped before the delivery report"),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn progress(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} {per_sec} {elapsed}<{eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("replay");
    bar
}

/// Produces `events` in order to their topics (`Event::topic`), keyed by
/// `Event::key`, with `Event::encode` as the value; Kafka keeps the order of
/// the events of one key. With `rate`, at most that many events per second
/// over the run (a positive number; infinity is no limit). At most 10,000
/// deliveries are in flight; every delivery report is awaited and the first
/// failed one is the error. Flushes the producer before returning.
pub async fn produce(
    events: &[Event],
    kafka: &KafkaSettings,
    rate: Option<f64>,
) -> Result<ReplayStats> {
    if let Some(r) = rate {
        if r.is_nan() || r <= 0.0 {
            bail!("the replay rate must be a positive number of events per second, not {r}");
        }
    }
    let rate = rate.filter(|r| r.is_finite());
    let producer: FutureProducer = kafka
        .producer_config()
        .create()
        .context("creating the Kafka producer")?;
    let bar = progress(events.len());
    let t0 = Instant::now();
    let mut stats = ReplayStats::default();
    let mut inflight = FuturesUnordered::new();
    for (k, e) in events.iter().enumerate() {
        if let Some(r) = rate {
            // Event k is due k / r seconds after the start.
            let due = Duration::try_from_secs_f64(k as f64 / r)
                .with_context(|| format!("replay rate {r} is too small"))?;
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let payload = e
            .encode()
            .with_context(|| format!("encoding event {k} ({})", e.topic().name()))?;
        let key = e.key();
        let topic = e.topic().name();
        loop {
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(&payload);
            match producer.send_result(record) {
                Ok(delivery) => {
                    inflight.push(delivery);
                    break;
                }
                // librdkafka's queue is full: wait for a delivery, then retry.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match inflight.next().await {
                        Some(r) => check_delivery(r)?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((err, _)) => bail!("producing to topic {topic}, key {key:?}: {err}"),
            }
        }
        match e {
            Event::Item(_) => stats.items += 1,
            Event::Relation(_) => stats.relations += 1,
            Event::Interaction(_) => stats.interactions += 1,
        }
        bar.inc(1);
        while inflight.len() >= MAX_IN_FLIGHT {
            if let Some(r) = inflight.next().await {
                check_delivery(r)?;
            }
        }
    }
    while let Some(r) = inflight.next().await {
        check_delivery(r)?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the Kafka producer")?;
    bar.finish_and_clear();
    stats.events = events.len();
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// A tiny MovieLens-like dataset: 6 users, 8 items (i8 in `.item` only,
    /// nobody interacted with it), ratings and timestamps, a KG whose genre
    /// links i1, i2 and i3, a duplicate (u1, i1) whose first occurrence
    /// counts.
    fn toy(dir: &Path) -> Dataset {
        write(
            dir,
            "toy.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
             u1\ti1\t5\t100\n\
             u2\ti1\t4\t100\n\
             u1\ti2\t4\t101\n\
             u2\ti2\t5\t102\n\
             u3\ti2\t3\t103\n\
             u1\ti3\t4\t104\n\
             u2\ti3\t4\t104\n\
             u3\ti3\t2\t105\n\
             u2\ti4\t4\t106\n\
             u3\ti4\t5\t106\n\
             u1\ti1\t1\t107\n\
             u4\ti1\t5\t110\n\
             u4\ti2\t4\t111\n\
             u4\ti3\t3\t112\n\
             u5\ti2\t4\t113\n\
             u5\ti4\t4\t114\n\
             u5\ti3\t5\t115\n\
             u1\ti5\t4\t120\n\
             u1\ti6\t5\t121\n\
             u6\ti5\t3\t122\n\
             u6\ti7\t4\t123\n\
             u6\ti6\t4\t124\n",
        );
        write(
            dir,
            "toy.item",
            "item_id:token\tmovie_title:token_seq\n\
             i1\tAlpha\ni2\tBeta\ni3\tGamma\ni5\tEpsilon\ni8\tNever Seen\n",
        );
        write(
            dir,
            "toy.kg",
            "head_id:token\trelation_id:token\ttail_id:token\n\
             e1\tfilm.genre\tg1\ne2\tfilm.genre\tg1\ne3\tfilm.genre\tg1\ne5\tfilm.genre\tg2\n",
        );
        write(
            dir,
            "toy.link",
            "item_id:token\tentity_id:token\ni1\te1\ni2\te2\ni3\te3\ni5\te5\n",
        );
        Dataset::load(dir).unwrap()
    }

    /// A split over [`toy`]: meta-training u1..u3 on i1..i4, new users u4
    /// (uc) and u6 (uic), and u1 on new items (ic).
    fn toy_split(dir: &Path, ds: &Dataset) -> Split {
        let s = dir.join("split");
        std::fs::create_dir_all(&s).unwrap();
        write(
            &s,
            "meta_training.txt",
            "u1 i1 i2 i3\nu2 i1 i2 i3 i4\nu3 i2 i3 i4\n",
        );
        write(&s, "uc_support.txt", "u4 i1 i2\nu5 i2 i4\n");
        write(&s, "uc_query.txt", "u4 i3\nu5 i3\n");
        write(&s, "ic_support.txt", "u1 i5\n");
        write(&s, "ic_query.txt", "u1 i6\n");
        write(&s, "uic_support.txt", "u6 i5 i7\n");
        write(&s, "uic_query.txt", "u6 i6\n");
        Split::read(&s, ds).unwrap()
    }

    fn pair(e: &Event) -> Option<(String, String)> {
        match e {
            Event::Interaction(x) => Some((x.user_id.clone(), x.item_id.clone())),
            _ => None,
        }
    }

    fn pairs_of(ds: &Dataset, tasks: &[(u32, Vec<u32>)]) -> HashSet<(String, String)> {
        tasks
            .iter()
            .flat_map(|(u, its)| {
                its.iter()
                    .map(|&i| (ds.users.id(*u).to_string(), ds.items.id(i).to_string()))
            })
            .collect()
    }

    fn support_and_query(ds: &Dataset, split: &Split) -> [HashSet<(String, String)>; 2] {
        let tasks: Vec<_> = split.scenarios.values().flatten().collect();
        [
            pairs_of(
                ds,
                &tasks
                    .iter()
                    .map(|t| (t.user, t.support.clone()))
                    .collect::<Vec<_>>(),
            ),
            pairs_of(
                ds,
                &tasks
                    .iter()
                    .map(|t| (t.user, t.query.clone()))
                    .collect::<Vec<_>>(),
            ),
        ]
    }

    /// Walks the events and checks the order rules every replay keeps: every
    /// item exactly once and before any interaction or edge naming it (in
    /// phase 1), edges once each, interactions in time order within a phase.
    fn check_order(events: &[Event], history: usize, ds: &Dataset) {
        let mut sent: HashMap<String, u64> = HashMap::new();
        let mut edges = HashSet::new();
        let mut last_ts = [0u64; 2];
        for (k, e) in events.iter().enumerate() {
            let phase = usize::from(k >= history);
            assert!(e.validate(&Limits::default()).is_ok(), "{e:?}");
            match e {
                Event::Item(x) => {
                    assert_eq!(phase, 0, "items are in phase 1");
                    assert!(
                        sent.insert(x.item_id.clone(), x.ts).is_none(),
                        "{x:?} twice"
                    );
                }
                Event::Relation(r) => {
                    assert_eq!(phase, 0, "edges are in phase 1");
                    assert_ne!(r.src, r.dst);
                    let (ts, td) = (sent.get(&r.src), sent.get(&r.dst));
                    assert!(ts.is_some() && td.is_some(), "edge {r:?} before its items");
                    assert_eq!(r.ts, *ts.unwrap().max(td.unwrap()), "{r:?}");
                    let (a, b) = if r.src < r.dst {
                        (&r.src, &r.dst)
                    } else {
                        (&r.dst, &r.src)
                    };
                    assert!(
                        edges.insert((r.relation.clone(), a.clone(), b.clone())),
                        "edge {r:?} twice"
                    );
                }
                Event::Interaction(x) => {
                    let item_ts = sent.get(&x.item_id);
                    assert!(item_ts.is_some(), "interaction {x:?} before its item");
                    assert!(*item_ts.unwrap() <= x.ts, "{x:?}: item later than its use");
                    assert!(x.ts >= last_ts[phase], "{x:?} out of time order");
                    last_ts[phase] = x.ts;
                }
            }
        }
        assert_eq!(sent.len(), ds.n_items(), "every item is sent");
    }

    #[test]
    fn without_a_split_every_pair_once_items_first() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let tl = dataset_timeline(&ds, None, &PkgConfig::default()).unwrap();
        assert_eq!(tl.skipped, 0);
        assert_eq!(tl.history, tl.events.len(), "no phase 2 without a split");
        check_order(&tl.events, tl.history, &ds);
        let pairs: Vec<_> = tl.events.iter().filter_map(pair).collect();
        let distinct: HashSet<_> = ds
            .interactions
            .iter()
            .map(|x| {
                (
                    ds.users.id(x.user).to_string(),
                    ds.items.id(x.item).to_string(),
                )
            })
            .collect();
        assert_eq!(pairs.len(), distinct.len(), "each pair once");
        assert_eq!(pairs.iter().cloned().collect::<HashSet<_>>(), distinct);
        // (u1, i1): the first occurrence's rating and time, not the repeat's.
        let u1i1 = tl
            .events
            .iter()
            .find_map(|e| match e {
                Event::Interaction(x) if x.user_id == "u1" && x.item_id == "i1" => Some(x),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (u1i1.kind, u1i1.value, u1i1.ts),
            (Kind::Rating, Some(5.0), 100_000)
        );
        // Item fields: id, exact title (empty without an .item row), KG
        // labels as categories, first time anywhere or the latest time.
        let items: BTreeMap<&str, &ItemEvent> = tl
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Item(x) => Some((x.item_id.as_str(), x)),
                _ => None,
            })
            .collect();
        assert_eq!(items["i1"].title, "Alpha");
        assert_eq!(items["i4"].title, "");
        assert_eq!(items["i1"].categories, ["+film.genre=g1"]);
        assert!(items["i4"].categories.is_empty());
        assert_eq!(items["i1"].ts, 100_000);
        assert_eq!(items["i7"].ts, 123_000);
        assert_eq!(items["i8"].ts, 124_000, "never interacted: the latest time");
        assert!(items
            .values()
            .all(|x| x.description.is_none() && x.features.is_none()));
        // An item comes right before its first interaction at the same time.
        let k1 = tl.events.iter().position(|e| e.key() == "i1").unwrap();
        let k2 = tl.events.iter().position(|e| pair(e).is_some()).unwrap();
        assert!(k1 < k2);
    }

    #[test]
    fn with_a_split_meta_training_then_support_never_query() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let split = toy_split(d.path(), &ds);
        let tl = dataset_timeline(&ds, Some(&split), &PkgConfig::default()).unwrap();
        assert_eq!(tl.skipped, 0);
        check_order(&tl.events, tl.history, &ds);
        let meta = pairs_of(&ds, &split.meta_training);
        let [support, query] = support_and_query(&ds, &split);
        let phase1: HashSet<_> = tl.events[..tl.history].iter().filter_map(pair).collect();
        let phase2: Vec<_> = tl.events[tl.history..].iter().filter_map(pair).collect();
        assert_eq!(phase1, meta);
        assert_eq!(
            phase2.len(),
            tl.events.len() - tl.history,
            "phase 2: interactions only"
        );
        assert_eq!(phase2.iter().cloned().collect::<HashSet<_>>(), support);
        assert_eq!(phase2.len(), support.len());
        for e in &tl.events {
            if let Some(p) = pair(e) {
                assert!(!query.contains(&p), "query interaction {p:?} replayed");
            }
        }
        // Support interactions keep their dataset time: u6's come in order.
        let u6: Vec<_> = phase2.iter().filter(|p| p.0 == "u6").collect();
        assert_eq!(u6.len(), 2);
        assert_eq!(u6[0].1, "i5");
    }

    #[test]
    fn relation_edges_once_each_after_both_endpoints() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let split = toy_split(d.path(), &ds);
        let cfg = PkgConfig::default();
        let tl = dataset_timeline(&ds, Some(&split), &cfg).unwrap();
        check_order(&tl.events, tl.history, &ds);
        // The catalogue relations of evaluation's inference graph; its
        // behavioural ones are the engine's to derive, never sent.
        let stream = crate::train::pkg_build::split_stream(&ds, &split);
        let all: Vec<u32> = (0..ds.n_items() as u32).collect();
        let (pkg, _) = build_pkg(&ds, &cfg, &all, &stream).unwrap();
        let mut want = HashSet::new();
        for (r, name) in pkg.relations().iter().enumerate() {
            if BEHAVIOURAL.contains(&name.as_str()) {
                assert!(pkg.edge_count(r).unwrap() > 0, "{name} has edges");
                continue;
            }
            for (a, b) in pkg.edges(r).unwrap() {
                let (a, b) = (pkg.ext_id(a).unwrap(), pkg.ext_id(b).unwrap());
                want.insert(format!("{a}|{name}|{b}"));
            }
        }
        let got: Vec<String> = tl
            .events
            .iter()
            .filter(|e| matches!(e, Event::Relation(_)))
            .map(Event::key)
            .collect();
        assert_eq!(got.len(), want.len(), "each undirected edge once");
        assert_eq!(got.into_iter().collect::<HashSet<_>>(), want);
        // The KG relation links the genre's items; no behavioural edge is sent.
        let names: Vec<&str> = pkg.relations().iter().map(String::as_str).collect();
        assert!(names.len() >= 3, "{names:?}");
        assert!(want.iter().any(|k| k.contains("|kg:")), "{want:?}");
        assert!(!want.iter().any(|k| k.contains("|co_")), "{want:?}");
        // An edge comes right after the later of its items.
        for (k, e) in tl.events.iter().enumerate() {
            if let Event::Relation(r) = e {
                let before = tl.events[..k]
                    .iter()
                    .rev()
                    .find(|e| !matches!(e, Event::Relation(_)))
                    .unwrap();
                match before {
                    Event::Item(x) => assert!(x.item_id == r.src || x.item_id == r.dst),
                    other => panic!("{r:?} after {other:?}"),
                }
            }
        }
    }

    #[test]
    fn replay_is_deterministic() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let split = toy_split(d.path(), &ds);
        let cfg = PkgConfig::default();
        let a = dataset_timeline(&ds, Some(&split), &cfg).unwrap();
        let b = dataset_timeline(&toy(d.path()), Some(&split), &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(dataset_events(&ds, Some(&split), &cfg).unwrap(), a.events);
        assert_eq!(
            dataset_events(&ds, None, &cfg).unwrap(),
            dataset_events(&ds, None, &cfg).unwrap()
        );
    }

    #[test]
    fn without_timestamps_file_order_and_views() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "plain.inter",
            "user_id:token\titem_id:token\nb\tx\na\ty\na\tx\nb\ty\n",
        );
        let ds = Dataset::load(d.path()).unwrap();
        let tl = dataset_timeline(&ds, None, &PkgConfig::default()).unwrap();
        check_order(&tl.events, tl.history, &ds);
        let inter: Vec<_> = tl
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Interaction(x) => {
                    Some((x.user_id.as_str(), x.item_id.as_str(), x.kind, x.ts))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            inter,
            [
                ("b", "x", Kind::View, 0),
                ("a", "y", Kind::View, 1000),
                ("a", "x", Kind::View, 2000),
                ("b", "y", Kind::View, 3000)
            ]
        );
        // Two shared users make x and y co-interacted, but that edge is the
        // engine's to derive from the interactions: the replay never sends it.
        assert!(!tl
            .events
            .iter()
            .any(|e| e.key().contains("|co_interacted|")));
    }

    #[test]
    fn events_the_streams_refuse_are_left_out_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let long = "t".repeat(5000);
        write(
            d.path(),
            "bad.inter",
            "user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\nu\ti2\t-5\nv\ti1\t2\n",
        );
        write(
            d.path(),
            "bad.item",
            &format!("item_id:token\tmovie_title:token_seq\ni1\t{long}\ni2\tok\n"),
        );
        let ds = Dataset::load(d.path()).unwrap();
        let tl = dataset_timeline(&ds, None, &PkgConfig::default()).unwrap();
        // i1's title is over 4 KiB; (u, i2) has a negative time.
        assert_eq!(tl.skipped, 2, "{:?}", tl.events);
        assert!(tl.events.iter().all(|e| e.key() != "i1"));
        assert!(tl
            .events
            .iter()
            .all(|e| e.validate(&Limits::default()).is_ok()));
        let i2 = tl.events.iter().find(|e| e.key() == "i2").unwrap();
        assert_eq!(i2.ts(), 2000, "an item without a valid time: the latest");
        assert_eq!(tl.events.iter().filter_map(pair).count(), 2);
    }

    #[test]
    fn a_split_naming_unknown_indexes_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let mut split = toy_split(d.path(), &ds);
        split.meta_training.push((0, vec![99]));
        let err = dataset_timeline(&ds, Some(&split), &PkgConfig::default()).unwrap_err();
        assert!(err.to_string().contains("item index 99"), "{err}");
    }

    fn card(relations: Vec<String>, pkg: PkgConfig) -> crate::train::ModelCard {
        let config = crate::train::TrainConfig {
            pkg,
            ..Default::default()
        };
        crate::train::ModelCard {
            version: "1".into(),
            relations,
            d_in: 8,
            dim: 4,
            hops: 3,
            dataset: String::new(),
            split: String::new(),
            config,
            bias_weights: Vec::new(),
            neighbour_weights: Vec::new(),
            aware_neighbour_weights: Vec::new(),
            fresh_weight: 0.0,
            aware_fresh_weight: 0.0,
            knn_weight: 0.0,
            aware_knn_weight: 0.0,
            fresh_knn_weight: 0.0,
            aware_fresh_knn_weight: 0.0,
            adapt_steps: 1,
            adapt_lr: 0.1,
            user_adapt: Default::default(),
            meta_adapt: None,
            training: serde_json::Value::Null,
        }
    }

    #[test]
    fn model_pkg_config_checks_the_relations() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let cfg = PkgConfig {
            kg_relations: 0,
            ..Default::default()
        };
        let m = d.path().join("model");
        std::fs::create_dir_all(&m).unwrap();
        let names = relation_names(&ds, &cfg);
        let json = serde_json::to_string(&card(names.clone(), cfg.clone())).unwrap();
        write(&m, "model.json", &json);
        let got = model_pkg_config(&ds, &m).unwrap();
        assert_eq!(relation_names(&ds, &got), names);

        let json = serde_json::to_string(&card(vec!["co_interacted".into()], cfg)).unwrap();
        write(&m, "model.json", &json);
        let err = model_pkg_config(&ds, &m).unwrap_err().to_string();
        assert!(err.contains("co_liked"), "{err}");
        let err = model_pkg_config(&ds, &d.path().join("nowhere")).unwrap_err();
        assert!(format!("{err:#}").contains("model.json"), "{err:#}");
    }

    /// Reads every record of the three topics back (until `n` or a timeout).
    fn read_back(brokers: &str, n: usize) -> Vec<(String, String, Vec<u8>)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "replay-test")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer
            .subscribe(&["items", "item-relations", "interactions"])
            .unwrap();
        let mut out = Vec::new();
        let t0 = Instant::now();
        while out.len() < n && t0.elapsed() < Duration::from_secs(30) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push((
                    m.topic().to_string(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_delivers_every_event_at_the_rate() {
        let d = tempfile::tempdir().unwrap();
        let ds = toy(d.path());
        let split = toy_split(d.path(), &ds);
        let events = dataset_events(&ds, Some(&split), &PkgConfig::default()).unwrap();
        let broker = crate::kafka::EmbeddedBroker::start(None).await.unwrap();
        let kafka = KafkaSettings::with_brokers(broker.bootstrap_servers());
        let rate = 200.0;
        let stats = produce(&events, &kafka, Some(rate)).await.unwrap();
        assert_eq!(stats.events, events.len());
        assert_eq!(
            stats.items + stats.relations + stats.interactions,
            events.len()
        );
        assert_eq!(stats.items, ds.n_items());
        let paced = (events.len() - 1) as f64 / rate;
        assert!(
            stats.seconds >= paced * 0.95,
            "{} s < {paced} s",
            stats.seconds
        );

        let brokers = broker.bootstrap_servers().to_string();
        let n = events.len();
        let got = tokio::task::spawn_blocking(move || read_back(&brokers, n))
            .await
            .unwrap();
        assert_eq!(got.len(), events.len());
        let want: HashSet<(String, String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.topic().name().to_string(), e.key(), e.encode().unwrap()))
            .collect();
        assert_eq!(got.into_iter().collect::<HashSet<_>>(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_names_the_failed_delivery() {
        let event = Event::Item(ItemEvent {
            item_id: "i1".into(),
            title: "t".into(),
            description: None,
            categories: Vec::new(),
            features: None,
            ts: 1,
        });
        // Nothing listens on port 1: the message times out.
        let mut kafka = KafkaSettings::with_brokers("127.0.0.1:1");
        kafka
            .properties
            .insert("message.timeout.ms".into(), "300".into());
        let err = produce(&[event], &kafka, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery failed: topic items"), "{err}");
        assert!(err.contains("\"i1\""), "{err}");
    }

    #[tokio::test]
    async fn produce_refuses_a_rate_that_is_not_positive() {
        let kafka = KafkaSettings::with_brokers("127.0.0.1:1");
        for r in [0.0, -1.0, f64::NAN] {
            let err = produce(&[], &kafka, Some(r)).await.unwrap_err().to_string();
            assert!(err.contains("positive"), "{err}");
        }
    }

    /// On the reference data (MovieLens-100K and the reference split; `make
    /// data` and `../shared/eval` beside the checkout): every item, every
    /// catalogue PKG edge, the meta-training and support interactions, and
    /// nothing else.
    #[test]
    fn reference_split_counts() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let (data, split_dir) = (
            root.join("data/ml-100k"),
            root.join("../shared/eval/ml100k-coldstart"),
        );
        assert!(
            data.join("ml-100k.inter").is_file() && split_dir.join("meta_training.txt").is_file(),
            "{} or {} is missing: run `make data` (the split is ../shared/eval)",
            data.display(),
            split_dir.display()
        );
        let ds = Dataset::load(&data).unwrap();
        let split = Split::read(&split_dir, &ds).unwrap();
        let cfg = PkgConfig::default();
        let tl = dataset_timeline(&ds, Some(&split), &cfg).unwrap();
        assert_eq!(tl.skipped, 0);
        check_order(&tl.events, tl.history, &ds);
        let stream = crate::train::pkg_build::split_stream(&ds, &split);
        let all: Vec<u32> = (0..ds.n_items() as u32).collect();
        let (pkg, _) = build_pkg(&ds, &cfg, &all, &stream).unwrap();
        let relations: usize = pkg
            .relations()
            .iter()
            .zip(pkg.edge_counts())
            .filter(|(name, _)| !BEHAVIOURAL.contains(&name.as_str()))
            .map(|(_, n)| n)
            .sum();
        let meta = pairs_of(&ds, &split.meta_training).len();
        let [support, query] = support_and_query(&ds, &split);
        assert_eq!(
            tl.events.len(),
            ds.n_items() + relations + meta + support.len()
        );
        assert_eq!(tl.events.len() - tl.history, support.len());
        assert!(tl
            .events
            .iter()
            .filter_map(pair)
            .all(|p| !query.contains(&p)));
        eprintln!(
            "ml-100k replay: {} events: {} items, {relations} edges, {meta} meta-training, {} support",
            tl.events.len(),
            ds.n_items(),
            support.len()
        );
    }
}
