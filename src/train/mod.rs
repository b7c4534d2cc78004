//! Offline training of the item model (MPKG) and its export (`thaw train`).
//!
//! Pipeline: universal item features X (text encoder ⊕ hashed KG bag) → the
//! PKG over meta-training items only (zero-shot items are absent) →
//! `Z_r = S_r^M X` → pre-training (eq. 14) → fine-tuning of the MRA layer with
//! BPR (eq. 16) → `model.json`, `weights.safetensors`, ONNX graphs.
//! At inference ([`infer_items`]) every item, new ones included, enters the
//! graph built from all training interactions, and embeddings are computed
//! inductively: project, propagate, fuse.

pub mod export;
pub mod features;
pub mod fresh;
pub mod meta_adapt;
pub mod metakg;
pub mod mpkg;
pub mod pkg_build;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array1, Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::eval::split::Split;
use crate::graph::{Propagator, PropagatorConfig};
use mpkg::{Mpkg, MpkgConfig, TrainGraph, BIAS_FEATURES};
use pkg_build::PkgConfig;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Autodiff or tensor error.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Graph error.
    #[error("graph: {0}")]
    Graph(#[from] crate::graph::Error),
    /// Text encoder or ONNX Runtime error.
    #[error("inference: {0}")]
    Infer(#[from] crate::infer::Error),
    /// Export error.
    #[error("export: {0}")]
    Export(String),
    /// Bad or missing data.
    #[error("{0}")]
    Data(String),
    /// File error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for training.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of `thaw train`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model's hyper-parameters.
    pub mpkg: MpkgConfig,
    /// How the PKG is built.
    pub pkg: PkgConfig,
    /// Buckets of the hashed KG bag in X (64).
    pub kg_dim: usize,
    /// Folder of the text encoder (`models/text`, from `onnx/setup.sh`).
    pub text_model_dir: PathBuf,
    /// Weights of the graph-neighbour score per PKG relation name (see
    /// [`crate::graph::Pkg::add_neighbour_scores`]) in the blind mode and the
    /// engine; relations not named score 0. Chosen on the reference split's
    /// `valid/` by mean blind NDCG@20 over scenarios.
    #[serde(default)]
    pub neighbour_weights: std::collections::BTreeMap<String, f32>,
    /// The same in `thaw eval`'s scenario-aware mode, where the bias also
    /// learns the scenario's own popularity: chosen on `valid/` by mean
    /// aware NDCG@20.
    #[serde(default)]
    pub aware_neighbour_weights: std::collections::BTreeMap<String, f32>,
    /// Weight of the fresh-item score ([`fresh::add_fresh_scores`]) in the
    /// blind mode and the engine; 0 for none. Chosen on `valid/` by mean
    /// blind NDCG@20 over scenarios, per dataset (`thaw train --fresh-weight`).
    #[serde(default)]
    pub fresh_weight: f32,
    /// The same in the scenario-aware mode.
    #[serde(default)]
    pub aware_fresh_weight: f32,
    /// Weight of the item-kNN score over the stream's co-occurrence counts
    /// ([`crate::graph::co::CoGraph::add_similarity_scores`]) in the blind
    /// mode and the engine; 0 for none. Chosen on `valid/` with the
    /// fresh-item weight (`thaw train --knn-weight`).
    #[serde(default)]
    pub knn_weight: f32,
    /// The same in the scenario-aware mode.
    #[serde(default)]
    pub aware_knn_weight: f32,
    /// Weight of the fresh-item kNN score ([`crate::adapt::add_fresh_knn_scores`])
    /// in the blind mode and the engine; 0 for none (`thaw train
    /// --fresh-knn-weight`).
    #[serde(default)]
    pub fresh_knn_weight: f32,
    /// The same in the scenario-aware mode.
    #[serde(default)]
    pub aware_fresh_knn_weight: f32,
    /// The per-user adaptation the engine and `thaw eval` run (written to
    /// `model.json`'s `user_adapt`).
    #[serde(default)]
    pub user_adapt: crate::adapt::AdaptConfig,
    /// Meta-training of the adaptation ([`meta_adapt`]).
    #[serde(default)]
    pub meta_adapt: meta_adapt::MetaAdaptConfig,
}

/// `weights` (by relation name) in the order of `relations`; unnamed ones 0.
pub fn weights_for(
    weights: &std::collections::BTreeMap<String, f32>,
    relations: &[String],
) -> Vec<f32> {
    relations
        .iter()
        .map(|r| weights.get(r).copied().unwrap_or(0.0))
        .collect()
}

/// The default graph-neighbour weights of the blind mode and the engine
/// ([`TrainConfig::neighbour_weights`]). On the reference split's `valid/`
/// (a model trained on `valid/meta_training.txt`), mean blind NDCG@20 over
/// scenarios rose from 0.158 without the term to a plateau of 0.185–0.187
/// for co_interacted ≥ 128; these are the smallest weights within 0.001 of
/// the best (co_interacted 1024, co_liked 32: 0.1868).
pub fn default_neighbour_weights() -> std::collections::BTreeMap<String, f32> {
    [
        ("co_interacted".to_string(), 256.0),
        ("co_liked".to_string(), 32.0),
    ]
    .into()
}

/// The default graph-neighbour weights of the scenario-aware mode
/// ([`TrainConfig::aware_neighbour_weights`]): on `valid/`, mean aware
/// NDCG@20 0.224 without the term, best 0.244 at co_interacted 16; larger
/// weights drown the scenario popularity the aware bias learns.
pub fn default_aware_neighbour_weights() -> std::collections::BTreeMap<String, f32> {
    [("co_interacted".to_string(), 16.0)].into()
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mpkg: MpkgConfig::default(),
            pkg: PkgConfig::default(),
            kg_dim: 64,
            text_model_dir: PathBuf::from("models/text"),
            neighbour_weights: default_neighbour_weights(),
            aware_neighbour_weights: default_aware_neighbour_weights(),
            fresh_weight: 0.0,
            aware_fresh_weight: 0.0,
            knn_weight: 0.0,
            aware_knn_weight: 0.0,
            fresh_knn_weight: 0.0,
            aware_fresh_knn_weight: 0.0,
            user_adapt: crate::adapt::AdaptConfig::default(),
            meta_adapt: meta_adapt::MetaAdaptConfig::default(),
        }
    }
}

/// `model.json`: what the engine and `thaw eval` need to use a trained model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// Model version (seconds since the epoch at training time).
    pub version: String,
    /// Relation names, in the order of the weights.
    pub relations: Vec<String>,
    /// Input feature size.
    pub d_in: usize,
    /// Embedding size.
    pub dim: usize,
    /// Propagation hops.
    pub hops: usize,
    /// Dataset digest.
    pub dataset: String,
    /// Split digest.
    pub split: String,
    /// Training settings.
    pub config: TrainConfig,
    /// Item-bias weights over the bias features.
    pub bias_weights: Vec<f32>,
    /// Graph-neighbour score weights, one per relation of `relations`
    /// ([`crate::graph::Pkg::add_neighbour_scores`]), of the blind mode and
    /// the engine; empty for none (models written before the term existed).
    #[serde(default)]
    pub neighbour_weights: Vec<f32>,
    /// The same for `thaw eval --scenario-aware`.
    #[serde(default)]
    pub aware_neighbour_weights: Vec<f32>,
    /// Weight of the fresh-item score ([`fresh::add_fresh_scores`]) in the
    /// blind mode and the engine; 0 (models written before it existed) for none.
    #[serde(default)]
    pub fresh_weight: f32,
    /// The same for `thaw eval --scenario-aware`.
    #[serde(default)]
    pub aware_fresh_weight: f32,
    /// Weight of the item-kNN score over the stream's `co_interacted`
    /// counts ([`crate::graph::co::CoGraph::add_similarity_scores`]) in the
    /// blind mode and the engine; 0 (models written before it existed) for
    /// none.
    #[serde(default)]
    pub knn_weight: f32,
    /// The same for `thaw eval --scenario-aware`.
    #[serde(default)]
    pub aware_knn_weight: f32,
    /// Weight of the fresh-item kNN score
    /// ([`crate::adapt::add_fresh_knn_scores`]) in the blind mode and the
    /// engine; 0 (models written before it existed) for none.
    #[serde(default)]
    pub fresh_knn_weight: f32,
    /// The same for `thaw eval --scenario-aware`.
    #[serde(default)]
    pub aware_fresh_knn_weight: f32,
    /// Adaptation settings for the engine: BPR steps and learning rate.
    pub adapt_steps: usize,
    /// Learning rate of per-user adaptation.
    pub adapt_lr: f64,
    /// The engine's per-user adaptation (`thaw serve`): steps and learning
    /// rate of BPR on a user's items from the mean of their embeddings.
    #[serde(default)]
    pub user_adapt: crate::adapt::AdaptConfig,
    /// The meta-learned adaptation (`meta_adapt.json` beside `model.json`),
    /// attached to `user_adapt` on load; `None` for a model without one.
    #[serde(skip)]
    pub meta_adapt: Option<std::sync::Arc<crate::adapt::MetaAdapt>>,
    /// Wall times and loss curves.
    pub training: serde_json::Value,
}

/// Text-encoder vectors of every dataset item's text (zero rows for items
/// without text), cached in `cache` keyed by the dataset digest.
pub fn text_vectors(
    ds: &Dataset,
    text_model_dir: &Path,
    cache: Option<&Path>,
) -> Result<Array2<f32>> {
    let cached = cache.map(|c| c.join(format!("text-{}.safetensors", ds.digest)));
    let mut text = match cached.as_ref().filter(|p| p.is_file()) {
        Some(p) => {
            let t = candle_core::safetensors::load(p, &candle_core::Device::Cpu)?;
            let v = t
                .get("text")
                .ok_or_else(|| TrainError::Data(format!("{}: no `text` tensor", p.display())))?;
            mpkg::to_array2(v)?
        }
        None => {
            let enc =
                crate::infer::text::TextEncoder::load(&crate::infer::text::TextEncoderConfig {
                    model_dir: text_model_dir.to_path_buf(),
                    ..Default::default()
                })?;
            let start = Instant::now();
            let texts: Vec<&str> = ds.item_text.iter().map(String::as_str).collect();
            let t = enc.embed(&texts)?;
            tracing::info!(
                items = texts.len(),
                seconds = start.elapsed().as_secs_f64(),
                "embedded item texts"
            );
            if let Some(p) = &cached {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(io(dir))?;
                }
                let map = HashMap::from([("text".to_string(), mpkg::from_array2(t.view())?)]);
                candle_core::safetensors::save(&map, p)?;
            }
            t
        }
    };
    if text.nrows() != ds.n_items() {
        return Err(TrainError::Data(format!(
            "text vectors have {} rows for {} items",
            text.nrows(),
            ds.n_items()
        )));
    }
    // An item without text gets a zero text vector rather than the embedding of "".
    for (i, s) in ds.item_text.iter().enumerate() {
        if s.is_empty() {
            text.row_mut(i).fill(0.0);
        }
    }
    Ok(text)
}

/// Universal features X of every dataset item: text vectors ⊕ hashed KG bag.
pub fn item_features(ds: &Dataset, cfg: &TrainConfig, cache: Option<&Path>) -> Result<Array2<f32>> {
    let text = text_vectors(ds, &cfg.text_model_dir, cache)?;
    Ok(features::item_features(ds, Some(text.view()), cfg.kg_dim))
}

/// Bias features per item ([`BIAS_FEATURES`] columns) from training
/// interactions `user_items` (dataset indexes) and optional per-item counts
/// within the user's scenario.
pub fn bias_features(
    ds: &Dataset,
    user_items: &[Vec<u32>],
    scenario_counts: Option<&[f32]>,
) -> Array2<f32> {
    let n = ds.n_items();
    // Event times as the stream stamps them (`pkg_build::interaction_ms`:
    // timestamps, else file positions), in seconds, so the engine's bias,
    // computed from the events it consumed, is this one.
    let mut ts: HashMap<(u32, u32), f64> = HashMap::new();
    for (x, ms) in ds.interactions.iter().zip(pkg_build::interaction_ms(ds)) {
        if let Some(ms) = ms {
            let t = ms as f64 / 1000.0;
            ts.entry((x.user, x.item))
                .and_modify(|v| *v = v.min(t))
                .or_insert(t);
        }
    }
    let mut count = vec![0f64; n];
    let mut first = vec![f64::INFINITY; n];
    let mut now = f64::NEG_INFINITY;
    for (u, its) in user_items.iter().enumerate() {
        for &i in its {
            count[i as usize] += 1.0;
            if let Some(&t) = ts.get(&(u as u32, i)) {
                first[i as usize] = first[i as usize].min(t);
                now = now.max(t);
            }
        }
    }
    let mut f = Array2::<f32>::zeros((n, BIAS_FEATURES));
    for i in 0..n {
        let days = if first[i].is_finite() && now.is_finite() {
            ((now - first[i]) / 86_400.0).max(1.0)
        } else {
            1.0
        };
        f[[i, 0]] = (count[i] as f32).ln_1p();
        f[[i, 1]] = ((count[i] / days) as f32).ln_1p();
        f[[i, 2]] = scenario_counts.map_or(0.0, |c| c[i].ln_1p());
    }
    f
}

/// Propagates per-relation inputs over the PKG: `S_r^M H_r` (eq. 1).
pub fn propagate(
    pkg: &crate::graph::Pkg,
    inputs: &[Array2<f32>],
    hops: usize,
) -> Result<Vec<Array2<f32>>> {
    let views: Vec<ArrayView2<'_, f32>> = inputs.iter().map(|a| a.view()).collect();
    let prop = Propagator::full(
        PropagatorConfig {
            hops,
            ..Default::default()
        },
        pkg,
        &views,
    )?;
    (0..inputs.len())
        .map(|r| Ok(prop.output(r)?.to_owned()))
        .collect()
}

/// The split's meta-training interactions per user (dataset indexes) and the
/// items they name, sorted: the training graph's items (every other item is
/// zero-shot).
pub fn meta_training(ds: &Dataset, split: &Split) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut user_items = vec![Vec::new(); ds.users.len()];
    for (u, its) in &split.meta_training {
        user_items[*u as usize] = its.clone();
    }
    let mut items: Vec<u32> = user_items.iter().flatten().copied().collect();
    items.sort_unstable();
    items.dedup();
    (user_items, items)
}

/// Trains MPKG on the split's meta-training data and writes the model folder.
pub fn train(ds: &Dataset, split: &Split, cfg: &TrainConfig, out: &Path) -> Result<ModelCard> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let t0 = Instant::now();
    let x_all = item_features(ds, cfg, Some(&out.join("cache")))?;
    let t_features = t0.elapsed().as_secs_f64();

    // Meta-training only: zero-shot items are absent from the training graph.
    let (user_items, items) = meta_training(ds, split);
    let stream = pkg_build::stream_order(ds, &[&user_items]);
    let (pkg, slot) = pkg_build::build_pkg(ds, &cfg.pkg, &items, &stream)?;
    let relations: Vec<String> = pkg.relations().to_vec();
    tracing::info!(items = items.len(), edges = ?pkg.edge_counts(), ?relations, "training graph");
    let x_sub = x_all.select(
        ndarray::Axis(0),
        &items.iter().map(|&i| i as usize).collect::<Vec<_>>(),
    );
    let z = propagate(&pkg, &vec![x_sub.clone(); relations.len()], cfg.mpkg.hops)?;
    let z = mpkg::stack_relations(&z)?;
    let x = mpkg::from_array2(x_sub.view())?;
    let neighbours: Vec<Vec<Vec<u32>>> = (0..relations.len())
        .map(|r| {
            (0..items.len() as u32)
                .map(|k| {
                    pkg.neighbours(r, k)
                        .map(<[u32]>::to_vec)
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    let graph = TrainGraph::new(items.len(), neighbours);

    let model = Mpkg::new(relations.len(), x_all.ncols(), &cfg.mpkg)?;
    let t1 = Instant::now();
    let pre_curve = model.pretrain(&z, &x, &graph, &cfg.mpkg)?;
    let t_pretrain = t1.elapsed().as_secs_f64();

    let t2 = Instant::now();
    let e = model.encode(&z)?;
    let bias_all = bias_features(ds, &user_items, None);
    let bias_sub = bias_all.select(
        ndarray::Axis(0),
        &items.iter().map(|&i| i as usize).collect::<Vec<_>>(),
    );
    let slot_items: Vec<Vec<u32>> = user_items
        .iter()
        .map(|its| {
            let mut v: Vec<u32> = its.iter().map(|i| slot[i]).collect();
            v.sort_unstable();
            v
        })
        .collect();
    let ft_curve = model.finetune(
        &e,
        &mpkg::from_array2(bias_sub.view())?,
        &slot_items,
        mpkg::FinetuneRun {
            steps: cfg.mpkg.finetune_steps,
            lr: cfg.mpkg.finetune_lr,
            seed: cfg.mpkg.seed ^ 0xf1,
        },
        &cfg.mpkg,
    )?;
    let t_finetune = t2.elapsed().as_secs_f64();

    let t3 = Instant::now();
    let meta_report = if cfg.meta_adapt.enabled {
        let m = train_meta_adapt(ds, cfg, &model, &x_sub, &user_items, &items)?;
        meta_adapt::write(out, &m.meta)?;
        serde_json::json!({
            "held_out_query_loss": m.held_out,
            "plain_held_out_loss_recall": m.plain,
            "scheduler_weights_loss_similarity": m.scheduler,
            "first_last_batch_loss": [m.losses.first(), m.losses.last()],
        })
    } else {
        let p = out.join(meta_adapt::FILE);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        serde_json::Value::Null
    };
    let t_meta = t3.elapsed().as_secs_f64();

    model.save(&out.join("weights.safetensors"))?;
    model.export_onnx(out)?;
    let version = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_else(|_| "0".into());
    let neighbour_weights = weights_for(&cfg.neighbour_weights, &relations);
    let aware_neighbour_weights = weights_for(&cfg.aware_neighbour_weights, &relations);
    let card = ModelCard {
        version,
        relations,
        d_in: x_all.ncols(),
        dim: cfg.mpkg.dim,
        hops: cfg.mpkg.hops,
        dataset: ds.digest.clone(),
        split: split.digest.clone(),
        config: cfg.clone(),
        bias_weights: model.bias_weights()?,
        neighbour_weights,
        aware_neighbour_weights,
        fresh_weight: cfg.fresh_weight,
        aware_fresh_weight: cfg.aware_fresh_weight,
        knn_weight: cfg.knn_weight,
        aware_knn_weight: cfg.aware_knn_weight,
        fresh_knn_weight: cfg.fresh_knn_weight,
        aware_fresh_knn_weight: cfg.aware_fresh_knn_weight,
        adapt_steps: 5,
        adapt_lr: 0.05,
        user_adapt: cfg.user_adapt.clone(),
        meta_adapt: None,
        training: serde_json::json!({
            "seconds": {"features": t_features, "pretrain": t_pretrain, "finetune": t_finetune, "meta_adapt": t_meta},
            "meta_adapt": meta_report,
            "pretrain_losses_kr_fr_hnr_mra": pre_curve,
            "finetune_bpr": ft_curve,
            "train_items": items.len(),
        }),
    };
    write_trained_items(out, items.iter().map(|&i| ds.items.id(i)))?;
    let json = serde_json::to_string_pretty(&card).map_err(|e| TrainError::Data(e.to_string()))?;
    let p = out.join("model.json");
    std::fs::write(&p, json).map_err(io(&p))?;
    Ok(card)
}

/// Meta-trains the adaptation of the model in `dir` again (`thaw train
/// --meta-only`), with `meta` as its settings, and rewrites its
/// `meta_adapt.json` and `model.json`.
pub fn retrain_meta_adapt(
    ds: &Dataset,
    split: &Split,
    dir: &Path,
    meta: &meta_adapt::MetaAdaptConfig,
) -> Result<meta_adapt::Trained> {
    let tm = TrainedModel::load(dir)?;
    if tm.card.split != split.digest || tm.card.dataset != ds.digest {
        return Err(TrainError::Data(format!(
            "{} was trained on another dataset or split: retrain it in full",
            dir.display()
        )));
    }
    let mut card = tm.card.clone();
    card.config.meta_adapt = meta.clone();
    let x_all = item_features(ds, &card.config, Some(&dir.join("cache")))?;
    let (user_items, items) = meta_training(ds, split);
    let x_sub = x_all.select(
        ndarray::Axis(0),
        &items.iter().map(|&i| i as usize).collect::<Vec<_>>(),
    );
    let m = train_meta_adapt(ds, &card.config, &tm.model, &x_sub, &user_items, &items)?;
    meta_adapt::write(dir, &m.meta)?;
    card.training["meta_adapt"] = serde_json::json!({
        "held_out_query_loss": m.held_out,
        "plain_held_out_loss_recall": m.plain,
        "scheduler_weights_loss_similarity": m.scheduler,
    });
    let json = serde_json::to_string_pretty(&card).map_err(|e| TrainError::Data(e.to_string()))?;
    let p = dir.join("model.json");
    std::fs::write(&p, json).map_err(io(&p))?;
    Ok(m)
}

/// Meta-trains the per-user adaptation ([`meta_adapt`]) over the trained
/// model's embeddings of the training items. The tasks' query interactions
/// are left out of the graph, the propagation and the bias features the
/// tasks are scored with, as evaluation queries are unseen.
fn train_meta_adapt(
    ds: &Dataset,
    cfg: &TrainConfig,
    model: &Mpkg,
    x_sub: &Array2<f32>,
    user_items: &[Vec<u32>],
    items: &[u32],
) -> Result<meta_adapt::Trained> {
    let ordered = {
        let stream = pkg_build::stream_order(ds, &[user_items]);
        let mut per_user = vec![Vec::new(); user_items.len()];
        for (u, i) in stream {
            per_user[u as usize].push(i);
        }
        per_user
    };
    let user_keys: Vec<u64> = (0..ds.users.len() as u32)
        .map(|u| crate::adapt::key(ds.users.id(u)))
        .collect();
    let tasks = meta_adapt::tasks(&ordered, &user_keys, &cfg.meta_adapt);
    // Every user's items without their task's query items.
    let mut seen = ordered.clone();
    let mut u_of_key: HashMap<u64, usize> = HashMap::new();
    for (u, k) in user_keys.iter().enumerate() {
        u_of_key.insert(*k, u);
    }
    for t in &tasks {
        let u = u_of_key[&t.user];
        seen[u].retain(|i| !t.query.contains(i));
    }
    let stream = pkg_build::stream_order(ds, &[&seen]);
    let (pkg, slot) = pkg_build::build_pkg(ds, &cfg.pkg, items, &stream)?;
    let relations = pkg.relations().len();
    let z = propagate(&pkg, &vec![x_sub.clone(); relations], cfg.mpkg.hops)?;
    let e = model.encode(&mpkg::stack_relations(&z)?)?;
    let emb = mpkg::to_array2(&model.fuse(&e, None)?)?;
    let mut sorted_seen = seen.clone();
    sorted_seen.iter_mut().for_each(|v| v.sort_unstable());
    let bias_all = bias_features(ds, &sorted_seen, None);
    let bias_sub = bias_all.select(
        ndarray::Axis(0),
        &items.iter().map(|&i| i as usize).collect::<Vec<_>>(),
    );
    let bias = item_bias(&bias_sub, &model.bias_weights()?);
    let keys: Vec<u64> = items
        .iter()
        .map(|&i| crate::adapt::key(ds.items.id(i)))
        .collect();
    let weights = weights_for(&cfg.neighbour_weights, pkg.relations());
    // The item-kNN term's counts, from the same stream in slots.
    let co = (cfg.knn_weight != 0.0).then(|| {
        let in_slots: Vec<(u32, u32)> = stream
            .iter()
            .filter_map(|(u, i)| slot.get(i).map(|&s| (*u, s)))
            .collect();
        pkg_build::behavioural(
            &cfg.pkg,
            &in_slots,
            |s| crate::adapt::key(ds.items.id(items[s as usize])),
            None,
        )
        .0
    });
    let to_slots = |v: &[u32]| v.iter().map(|i| slot[i]).collect::<Vec<u32>>();
    let tasks: Vec<meta_adapt::MetaTask> = tasks
        .into_iter()
        .map(|t| meta_adapt::MetaTask {
            user: t.user,
            support: to_slots(&t.support),
            query: to_slots(&t.query),
        })
        .collect();
    tracing::info!(tasks = tasks.len(), "meta-training the per-user adaptation");
    let cat = meta_adapt::MetaCatalogue {
        emb: emb.view(),
        bias: bias.view(),
        keys: &keys,
        graph: Some((&pkg, &weights)),
        knn: co.as_ref().map(|c| (c, cfg.knn_weight)),
    };
    meta_adapt::train(&cat, &tasks, &cfg.user_adapt, &cfg.meta_adapt, None)
}

/// Writes [`fresh::TRAINED_ITEMS_FILE`]: the external ids of the items the
/// model was trained with interactions, one per line.
pub fn write_trained_items<'a>(out: &Path, ids: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut text = String::new();
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    let p = out.join(fresh::TRAINED_ITEMS_FILE);
    std::fs::write(&p, text).map_err(io(&p))
}

/// Reads [`fresh::TRAINED_ITEMS_FILE`] of a model folder; `None` when the
/// folder has none (a model written before the fresh-item score existed).
pub fn read_trained_items(dir: &Path) -> Result<Option<std::collections::HashSet<String>>> {
    let p = dir.join(fresh::TRAINED_ITEMS_FILE);
    match std::fs::read_to_string(&p) {
        Ok(text) => Ok(Some(
            text.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TrainError::Io { path: p, source }),
    }
}

/// Writes a model folder with MPKG's seeded initial weights and no training
/// (`model.json`, weights, both ONNX graphs), for tests and benchmarks of the
/// engine, whose mechanics do not depend on what the weights learned.
/// `d_in` must be the text encoder's width plus `cfg.kg_dim`.
pub fn write_untrained_model(
    out: &Path,
    relations: Vec<String>,
    d_in: usize,
    cfg: &TrainConfig,
    version: &str,
) -> Result<ModelCard> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let model = Mpkg::new(relations.len(), d_in, &cfg.mpkg)?;
    model.save(&out.join("weights.safetensors"))?;
    model.export_onnx(out)?;
    let neighbour_weights = weights_for(&cfg.neighbour_weights, &relations);
    let aware_neighbour_weights = weights_for(&cfg.aware_neighbour_weights, &relations);
    let card = ModelCard {
        version: version.to_string(),
        relations,
        d_in,
        dim: cfg.mpkg.dim,
        hops: cfg.mpkg.hops,
        dataset: String::new(),
        split: String::new(),
        config: cfg.clone(),
        bias_weights: model.bias_weights()?,
        neighbour_weights,
        aware_neighbour_weights,
        fresh_weight: cfg.fresh_weight,
        aware_fresh_weight: cfg.aware_fresh_weight,
        knn_weight: cfg.knn_weight,
        aware_knn_weight: cfg.aware_knn_weight,
        fresh_knn_weight: cfg.fresh_knn_weight,
        aware_fresh_knn_weight: cfg.aware_fresh_knn_weight,
        adapt_steps: cfg.mpkg.adapt_steps,
        adapt_lr: cfg.mpkg.finetune_lr,
        user_adapt: cfg.user_adapt.clone(),
        meta_adapt: None,
        training: serde_json::json!({"untrained": true}),
    };
    let json = serde_json::to_string_pretty(&card).map_err(|e| TrainError::Data(e.to_string()))?;
    let p = out.join("model.json");
    std::fs::write(&p, json).map_err(io(&p))?;
    Ok(card)
}

/// A loaded model folder.
pub struct TrainedModel {
    /// `model.json`.
    pub card: ModelCard,
    /// The weights.
    pub model: Mpkg,
    /// The folder.
    pub dir: PathBuf,
}

impl TrainedModel {
    /// Loads `dir/model.json` and `dir/weights.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("model.json");
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        let mut card: ModelCard = serde_json::from_str(&text)
            .map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))?;
        card.meta_adapt = meta_adapt::read(dir, card.dim)?.map(std::sync::Arc::new);
        card.user_adapt = card.user_adapt.clone().with_meta(card.meta_adapt.as_ref());
        let model = Mpkg::load(&dir.join("weights.safetensors"))?;
        if model.relations() != card.relations.len() {
            return Err(TrainError::Data(format!(
                "{}: weights have {} relations, model.json {}",
                dir.display(),
                model.relations(),
                card.relations.len()
            )));
        }
        Ok(Self {
            card,
            model,
            dir: dir.to_path_buf(),
        })
    }
}

/// The inference graph: every dataset item (slots are the item indexes, as
/// items enter in order) with the PKG built from `stream` (all training
/// interactions in stream order, `pkg_build::split_stream`, so new items
/// enter with their first interactions). Errors if its relations are not the
/// model's.
pub fn inference_graph(
    ds: &Dataset,
    tm: &TrainedModel,
    stream: &[(u32, u32)],
) -> Result<crate::graph::Pkg> {
    let items: Vec<u32> = (0..ds.n_items() as u32).collect();
    let (pkg, slot) = pkg_build::build_pkg(ds, &tm.card.config.pkg, &items, stream)?;
    tracing::debug!(items = items.len(), edges = ?pkg.edge_counts(), "inference graph");
    if slot.iter().any(|(i, s)| i != s) {
        return Err(TrainError::Data(
            "inference graph slots differ from item indexes".into(),
        ));
    }
    if pkg.relations() != tm.card.relations.as_slice() {
        return Err(TrainError::Data(format!(
            "graph relations {:?} differ from the model's {:?}",
            pkg.relations(),
            tm.card.relations
        )));
    }
    Ok(pkg)
}

/// Per-relation embeddings `E_r = S_r^M (X W_r)` of every slot of `pkg`
/// from the features `x_all` (one row per slot).
pub fn relation_embeddings(
    tm: &TrainedModel,
    pkg: &crate::graph::Pkg,
    x_all: &Array2<f32>,
) -> Result<Vec<Array2<f32>>> {
    let w = tm.model.proj_array()?;
    let projected: Vec<Array2<f32>> = (0..w.dim().0)
        .map(|r| x_all.dot(&w.index_axis(ndarray::Axis(0), r)))
        .collect();
    propagate(pkg, &projected, tm.card.hops)
}

/// Inductive inference for every dataset item ([`inference_graph`], then
/// features projected, propagated and fused). Returns the relation
/// embeddings [R, N, d], the fused ones [N, d] and the graph.
pub fn infer_items(
    ds: &Dataset,
    tm: &TrainedModel,
    x_all: &Array2<f32>,
    stream: &[(u32, u32)],
) -> Result<(ndarray::Array3<f32>, Array2<f32>, crate::graph::Pkg)> {
    let pkg = inference_graph(ds, tm, stream)?;
    let e = relation_embeddings(tm, &pkg, x_all)?;
    let views: Vec<_> = e
        .iter()
        .map(|a| a.view().insert_axis(ndarray::Axis(1)))
        .collect();
    let e_nrd = ndarray::concatenate(ndarray::Axis(1), &views)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    let fused = tm.model.fuse_array(e_nrd.view())?;
    Ok((e_nrd, fused, pkg))
}

/// Item biases from bias features and weights.
pub fn item_bias(features: &Array2<f32>, weights: &[f32]) -> Array1<f32> {
    features.dot(&Array1::from(weights.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Pkg;
    use rand::{Rng, SeedableRng};

    /// A zero-shot item enters a trained graph with its edges: its embedding
    /// computed inductively (incremental propagation of the new rows) equals
    /// the one from propagating the whole graph that contains it from scratch.
    #[test]
    fn zero_shot_item_inductive_equals_full_recomputation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (n, r, d) = (40usize, 2usize, 6usize);
        let edges: Vec<(usize, u32, u32)> = (0..120)
            .map(|_| {
                (
                    rng.random_range(0..r),
                    rng.random_range(0..n as u32),
                    rng.random_range(0..n as u32),
                )
            })
            .filter(|(_, a, b)| a != b)
            .collect();
        let rows: Vec<Array2<f32>> = (0..r)
            .map(|_| Array2::from_shape_fn((n, d), |_| rng.random::<f32>()))
            .collect();
        let zero_shot = 17u32;
        let id = |i: u32| format!("item{i}");

        // Full graph, every item present.
        let mut full = Pkg::new(["a", "b"]).unwrap();
        for i in 0..n as u32 {
            full.add_item(&id(i));
        }
        for &(rel, a, b) in &edges {
            full.add_edge(rel, a, b).unwrap();
        }
        let full_out = propagate(&full, &rows, 3).unwrap();

        // Training graph without the zero-shot item, then the item arrives.
        let mut g = Pkg::new(["a", "b"]).unwrap();
        let mut slot = HashMap::new();
        for i in (0..n as u32).filter(|&i| i != zero_shot) {
            slot.insert(i, g.add_item(&id(i)));
        }
        for &(rel, a, b) in edges
            .iter()
            .filter(|(_, a, b)| *a != zero_shot && *b != zero_shot)
        {
            g.add_edge(rel, slot[&a], slot[&b]).unwrap();
        }
        let inputs_of = |g: &Pkg, rel: usize| {
            Array2::from_shape_fn((g.slots(), d), |(s, k)| {
                let ext: u32 = g
                    .ext_id(s as u32)
                    .and_then(|e| e[4..].parse().ok())
                    .unwrap_or(0);
                rows[rel][[ext as usize, k]]
            })
        };
        let inputs: Vec<Array2<f32>> = (0..r).map(|rel| inputs_of(&g, rel)).collect();
        let views: Vec<_> = inputs.iter().map(|a| a.view()).collect();
        let mut prop = Propagator::full(PropagatorConfig::default(), &g, &views).unwrap();
        g.take_changes();
        let z = g.add_item(&id(zero_shot));
        slot.insert(zero_shot, z);
        for &(rel, a, b) in edges
            .iter()
            .filter(|(_, a, b)| *a == zero_shot || *b == zero_shot)
        {
            g.add_edge(rel, slot[&a], slot[&b]).unwrap();
        }
        let mut batch = g.take_changes();
        for (rel, x) in rows.iter().enumerate() {
            batch.set_input(rel, z, x.row(zero_shot as usize).as_slice().unwrap());
        }
        prop.apply(&g, &batch).unwrap();
        for (rel, out) in full_out.iter().enumerate() {
            for i in 0..n as u32 {
                let a = prop.row(rel, slot[&i]).unwrap();
                let b = out.row(i as usize);
                let diff = (&a - &b).iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(diff <= 1e-5, "relation {rel} item {i}: {diff}");
            }
        }
        assert!(
            full.degree(0, zero_shot).unwrap() + full.degree(1, zero_shot).unwrap() > 0,
            "the zero-shot item has edges"
        );
    }
}
