//! The product graph learns from the interaction stream: the engine's core,
//! fed a dataset's replay timeline event by event, ends with behavioural
//! relations (`co_interacted`, `co_liked`) equal, edge for edge, to the
//! offline build over the same interactions (the graph `thaw train` and
//! `thaw eval` use), and the timeline carries none of those edges: every
//! one was derived by the engine from an interaction it had consumed. The
//! core reads users' interactions interleaved as Kafka's partitions give
//! them, not in the offline stream order: once idle (settled), the graph is
//! the same.
//!
//! Needs `make data` (MovieLens-100K, Last.FM), `make models` (the text
//! encoder, for the engine's item texts) and `../shared/eval` beside the
//! checkout (the reference splits); a missing one fails with what to run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thaw::dataset::Dataset;
use thaw::eval::split::Split;
use thaw::ingest::batch::Msg;
use thaw::ingest::Event;
use thaw::serve::config::GraphSettings;
use thaw::serve::metrics::Metrics;
use thaw::serve::state::{Core, LoadedModel, Mode};
use thaw::train::pkg_build::{self, PkgConfig, BEHAVIOURAL};

const TEXT_DIR: &str = "models/text";

fn need(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{} is missing: run `{what}` first (make test does)",
        path.display()
    );
}

/// `(relation, smaller id, larger id)` of every behavioural edge of `pkg`.
fn behavioural_edges(pkg: &thaw::graph::Pkg) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (r, name) in pkg.relations().iter().enumerate() {
        if !BEHAVIOURAL.contains(&name.as_str()) {
            continue;
        }
        for (a, b) in pkg.edges(r).unwrap() {
            let (a, b) = (pkg.ext_id(a).unwrap(), pkg.ext_id(b).unwrap());
            let (a, b) = if a < b { (a, b) } else { (b, a) };
            out.insert((name.clone(), a.to_string(), b.to_string()));
        }
    }
    out
}

/// `batch` as the engine reads it from Kafka: `interactions` is keyed by
/// user over 12 partitions, read one after another, so users' streams
/// interleave otherwise than in the timeline (each user's own order kept).
/// Other events keep their places; the interactions fill theirs in the
/// partitions' order.
fn as_partitions_read(batch: &[Event]) -> Vec<Event> {
    let partition = |e: &Event| match e {
        Event::Interaction(x) => Some(thaw::adapt::key(&x.user_id) % 12),
        _ => None,
    };
    let mut moved: Vec<&Event> = batch.iter().filter(|e| partition(e).is_some()).collect();
    moved.sort_by_key(|e| partition(e));
    let mut moved = moved.into_iter();
    batch
        .iter()
        .map(|e| match partition(e) {
            Some(_) => moved.next().expect("as many interactions").clone(),
            None => e.clone(),
        })
        .collect()
}

fn online_equals_offline(data: &str, split: &str, cfg: PkgConfig) {
    let (data, split) = (PathBuf::from(data), PathBuf::from(split));
    need(&data, "make data");
    need(
        &split.join("meta_training.txt"),
        "ls ../shared/eval (the reference splits)",
    );
    need(
        &Path::new(TEXT_DIR).join("text_encoder.onnx"),
        "make models",
    );
    let ds = Dataset::load(&data).unwrap();
    let split = Split::read(&split, &ds).unwrap();

    // Offline: the inference graph's build over the split's stream.
    let all: Vec<u32> = (0..ds.n_items() as u32).collect();
    let stream = pkg_build::split_stream(&ds, &split);
    let (offline, _) = pkg_build::build_pkg(&ds, &cfg, &all, &stream).unwrap();
    let want = behavioural_edges(&offline);
    assert!(
        want.len() > 1000,
        "the offline graph has behavioural edges ({})",
        want.len()
    );

    // The replay sends none of them.
    let timeline = thaw::tools::replay::dataset_timeline(&ds, Some(&split), &cfg).unwrap();
    let sent = timeline
        .events
        .iter()
        .filter(|e| matches!(e, Event::Relation(r) if BEHAVIOURAL.contains(&r.relation.as_str())))
        .count();
    assert_eq!(sent, 0, "the replay sends no derived edge");

    // Online: the engine's core with a model of the same relations and PKG
    // settings, fed the timeline in batches (as ingest windows would).
    let dir = tempfile::tempdir().unwrap();
    let mut tcfg = thaw::train::TrainConfig {
        text_model_dir: PathBuf::from(TEXT_DIR),
        pkg: cfg.clone(),
        ..Default::default()
    };
    tcfg.mpkg.seed = 3;
    let relations = offline.relations().to_vec();
    thaw::train::write_untrained_model(dir.path(), relations, 384 + tcfg.kg_dim, &tcfg, "t")
        .unwrap();
    let model = LoadedModel::load(dir.path(), Path::new(TEXT_DIR), None).unwrap();
    let mut core = Core::new(
        model,
        Default::default(),
        20,
        false,
        &GraphSettings::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let (history, live) = timeline.events.split_at(timeline.history);
    for (phase, events) in [("history", history), ("live", live)] {
        for batch in events.chunks(5_000) {
            let msgs: Vec<Msg> = as_partitions_read(batch)
                .into_iter()
                .map(|e| Msg::new(e, None))
                .collect();
            core.apply(&msgs, Mode::Restore).unwrap();
        }
        // The engine settles the behavioural lists when the stream is idle.
        core.idle().unwrap();
        if phase == "history" {
            // No edge ahead of the interactions consumed so far: after the
            // history phase the online graph is the offline build over the
            // meta-training interactions alone.
            let (meta, _) = thaw::train::meta_training(&ds, &split);
            let prefix = pkg_build::stream_order(&ds, &[&meta]);
            let (g, _) = pkg_build::build_pkg(&ds, &cfg, &all, &prefix).unwrap();
            assert_eq!(
                behavioural_edges(core.graph()),
                behavioural_edges(&g),
                "after the history phase"
            );
        }
    }
    let got = behavioural_edges(core.graph());
    let only_online: Vec<_> = got.difference(&want).take(5).collect();
    let only_offline: Vec<_> = want.difference(&got).take(5).collect();
    assert!(
        only_online.is_empty() && only_offline.is_empty(),
        "online {} vs offline {} edges; only online {only_online:?}; only offline {only_offline:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn ml100k_online_graph_equals_offline_build() {
    // ML-100K has ratings: co_interacted and co_liked.
    online_equals_offline(
        "data/ml-100k",
        "../shared/eval/ml100k-coldstart",
        PkgConfig {
            kg_relations: 0,
            ..Default::default()
        },
    );
}

#[test]
fn lastfm_online_graph_equals_offline_build() {
    // Last.FM has play counts, not ratings: co_interacted only; a window
    // smaller than most users' histories, so the window is exercised.
    online_equals_offline(
        "data/lastfm-dbpedia",
        "../shared/eval/lastfm-coldstart",
        PkgConfig {
            kg_relations: 2,
            window: 20,
            ..Default::default()
        },
    );
}
