//! Catch-up mode: batches applied while the engine is behind hold back
//! propagation, fusion, adaptation and publishing, and the next live batch
//! does them once for all. The state they lead to, and what an idle engine
//! then publishes, is the state of an engine that published every batch.
//! Snapshots: a state written, read back and loaded continues the same way.
//!
//! The engine's core with a real text encoder (`make models`) and an item
//! model with MPKG's initial weights, fed a synthetic catalogue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thaw::ingest::batch::Msg;
use thaw::ingest::{Event, InteractionEvent, ItemEvent, Kind, Op, RelationEvent};
use thaw::publish::Publish;
use thaw::serve::config::GraphSettings;
use thaw::serve::metrics::Metrics;
use thaw::serve::state::{Core, LoadedModel, Mode};

const TEXT_DIR: &str = "models/text";

fn core(dir: &Path) -> Core {
    let model = LoadedModel::load(dir, Path::new(TEXT_DIR), None).unwrap();
    Core::new(
        model,
        Default::default(),
        10,
        true,
        &GraphSettings::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

/// A folder with an item model of MPKG's initial weights (seeded) over
/// `relations`, version `t`; fails when the text encoder is missing.
fn untrained(relations: &[&str], seed: u64) -> tempfile::TempDir {
    assert!(
        Path::new(TEXT_DIR).join("text_encoder.onnx").is_file(),
        "no text encoder in {TEXT_DIR}: run `make models` first"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = thaw::train::TrainConfig {
        text_model_dir: PathBuf::from(TEXT_DIR),
        ..Default::default()
    };
    cfg.mpkg.seed = seed;
    thaw::train::write_untrained_model(
        dir.path(),
        relations.iter().map(|r| r.to_string()).collect(),
        384 + cfg.kg_dim,
        &cfg,
        "t",
    )
    .unwrap();
    dir
}

fn msg(event: Event, ms: i64) -> Msg {
    Msg::new(event, Some(ms))
}

/// Three batches: items; edges and clicks; more items, edges and clicks.
fn batches() -> Vec<Vec<Msg>> {
    let item = |i: usize| {
        msg(
            Event::Item(ItemEvent {
                item_id: format!("i{i}"),
                title: format!("Item number {i} of a shop"),
                description: None,
                categories: vec![],
                features: None,
                ts: i as u64,
            }),
            i as i64,
        )
    };
    let edge = |a: usize, b: usize, r: &str| {
        msg(
            Event::Relation(RelationEvent {
                src: format!("i{a}"),
                dst: format!("i{b}"),
                relation: r.into(),
                op: Op::Add,
                ts: 100,
            }),
            100,
        )
    };
    let click = |u: usize, i: usize| {
        msg(
            Event::Interaction(InteractionEvent {
                user_id: format!("u{u}"),
                item_id: format!("i{i}"),
                kind: Kind::Click,
                value: None,
                ts: 200 + i as u64,
            }),
            200,
        )
    };
    vec![
        (0..20).map(item).collect(),
        (0..20)
            .map(|i| edge(i, (i * 7 + 3) % 20, "also_bought"))
            .chain((0..12).map(|i| click(i % 4, i)))
            .collect(),
        (20..30)
            .map(item)
            .chain((20..30).map(|i| edge(i, i - 15, "also_viewed")))
            .chain((0..8).map(|i| click(i % 3 + 2, 20 + i)))
            .collect(),
    ]
}

/// Item embeddings and user lists of `p`, by id.
type State = (BTreeMap<String, Vec<f32>>, BTreeMap<String, Vec<String>>);

fn absorb(state: &mut State, p: &Publish) {
    for it in &p.items {
        state.0.insert(it.id.clone(), it.emb.clone());
    }
    for u in &p.users {
        state
            .1
            .insert(u.id.clone(), u.recs.iter().map(|r| r.0.clone()).collect());
    }
}

#[test]
fn batches_held_back_then_flushed_reach_the_state_of_published_batches() {
    let dir = untrained(&["also_bought", "also_viewed"], 11);

    let mut live = core(dir.path());
    let mut live_state = State::default();
    for b in batches() {
        absorb(&mut live_state, &live.apply(&b, Mode::Live).unwrap().0);
    }
    absorb(&mut live_state, &live.idle().unwrap());

    let mut caught = core(dir.path());
    let mut caught_state = State::default();
    let all = batches();
    let n_sources: usize = all.iter().flatten().count();
    for b in &all[..2] {
        let (p, applied) = caught.apply(b, Mode::CatchUp).unwrap();
        assert!(
            p.is_empty() && p.sources.is_empty(),
            "nothing published while behind"
        );
        assert_eq!(applied.applied.values().sum::<u64>(), b.len() as u64);
    }
    assert_eq!(caught.pending_batches(), 2);
    let (p, _) = caught.apply(&all[2], Mode::Live).unwrap();
    assert_eq!(caught.pending_batches(), 0);
    // The flush carries every held-back event's freshness source: each item
    // event, each edge that changed the graph, each click of a listed user.
    assert!(
        p.sources.len() >= n_sources - 8,
        "{} sources",
        p.sources.len()
    );
    assert_eq!(p.items.len(), 30, "every item published by the flush");
    assert_eq!(p.users.len(), 5, "every user with clicks");
    absorb(&mut caught_state, &p);
    absorb(&mut caught_state, &caught.idle().unwrap());

    assert_eq!(live_state.0.len(), caught_state.0.len());
    for (id, a) in &live_state.0 {
        let b = &caught_state.0[id];
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "item {id}: embeddings differ by {diff}");
    }
    assert_eq!(live_state.1, caught_state.1, "the same lists");

    // An empty live batch flushes too.
    let mut c = core(dir.path());
    c.apply(&all[0], Mode::CatchUp).unwrap();
    let (p, _) = c.apply(&[], Mode::Live).unwrap();
    assert_eq!(p.items.len(), 20);
    assert!(
        c.apply(&[], Mode::Live).unwrap().0.is_empty(),
        "then nothing"
    );
}

/// A snapshot taken between batches, written, read back and loaded into a
/// fresh core, continues to the state of the core that never stopped; the
/// restore passes over a snapshot the committed offsets do not cover, one
/// of another model version, and a corrupt one.
#[test]
fn a_snapshot_loaded_into_a_fresh_core_continues_to_the_same_state() {
    use thaw::serve::snapshot::{self, Covered};
    // With a behavioural relation, learnt from the clicks: its counts are
    // part of the state.
    let dir = untrained(&["also_bought", "also_viewed", "co_interacted"], 12);
    let all = batches();
    // Four users on items 0 and 1: pairs with two shared users, edges.
    let shared: Vec<Msg> = (0..4)
        .flat_map(|u| [0, 1].map(|i| (u, i)))
        .map(|(u, i)| {
            msg(
                Event::Interaction(InteractionEvent {
                    user_id: format!("u{u}"),
                    item_id: format!("i{i}"),
                    kind: Kind::Click,
                    value: None,
                    ts: 300,
                }),
                300,
            )
        })
        .collect();
    let mut whole = core(dir.path());
    for b in [&all[0], &all[1], &shared] {
        whole.apply(b, Mode::Live).unwrap();
    }
    let snaps = dir.path().join("snapshots");
    let at = |n: i64| -> Covered { [(("items".to_string(), 0), n)].into_iter().collect() };
    let (path, bytes) = snapshot::write(&snaps, &whole.state(), &at(52)).unwrap();
    assert!(bytes > 0 && path.is_file());

    // Ahead of the committed offsets, or of another model: passed over.
    assert!(snapshot::latest(&snaps, "t", &at(51)).is_none());
    assert!(snapshot::latest(&snaps, "t", &Covered::new()).is_none());
    assert!(snapshot::latest(&snaps, "other", &at(52)).is_none());
    let (_, state, header) = snapshot::latest(&snaps, "t", &at(60)).expect("the snapshot");
    assert_eq!(header.covered(), at(52));
    assert_eq!((header.items, header.users), (20, 4));

    let mut restored = core(dir.path());
    restored.set_state(state).unwrap();
    restored.finish_restore().unwrap();
    assert_eq!(restored.users(), whole.users());
    assert_eq!(restored.graph().edge_counts(), whole.graph().edge_counts());
    assert!(
        whole.graph().edge_counts()[2] > 0,
        "the clicks made behavioural edges"
    );
    let mut a = State::default();
    let mut b = State::default();
    for (core, st) in [(&mut whole, &mut a), (&mut restored, &mut b)] {
        core.apply(&all[2], Mode::Live).unwrap();
        core.idle().unwrap();
        absorb(st, &core.publish_all().unwrap());
    }
    assert_eq!(a.0.len(), 30);
    for (id, x) in &a.0 {
        let y = &b.0[id];
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "item {id}: embeddings differ by {diff}");
    }
    assert_eq!(a.1, b.1, "the same lists");

    // A corrupt payload is refused (its digest), the older intact one used.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (newer, _) = snapshot::write(&snaps, &whole.state(), &at(55)).unwrap();
    let mut raw = std::fs::read(&newer).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0xff;
    std::fs::write(&newer, raw).unwrap();
    assert!(snapshot::read(&newer).is_err());
    let (used, _, _) = snapshot::latest(&snaps, "t", &at(60)).unwrap();
    assert_eq!(used, path, "the intact older snapshot");
    // A state of another model is refused by the core, which keeps its own.
    let mut other = whole.state();
    other.version = "other".into();
    let users = restored.users();
    assert!(restored.set_state(other).is_err());
    assert_eq!(restored.users(), users);
}
