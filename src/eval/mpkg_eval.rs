//! MPKG in `thaw eval`: inductive item embeddings from a trained model folder,
//! scored for each user exactly as the engine scores them
//! ([`crate::adapt`]): the user's most recent items (in stream order)
//! averaged (eq. 15), the model's adaptation steps on them
//! ([`crate::adapt::adapt_user`], `model.json`'s `user_adapt`), then
//! `u · e + b` plus the graph-neighbour and fresh-item terms of the user's
//! items ([`crate::adapt::score_users`]). In the aware mode the MRA
//! layer and the bias are fine-tuned further on the scenario's support sets
//! (as MetaKG adapts per scenario) before the same user path.

use ndarray::{Array1, Array2, ArrayViewMut2, Axis};
use serde_json::json;

use super::registry::Fitted;
use super::{EvalError, FitContext, Recommender, Result};
use crate::adapt::{adapt_user, key, score_users, AdaptConfig, Catalogue};
use crate::train::{self, mpkg, TrainedModel};

/// The engine's user path over the whole catalogue (every item is active,
/// as every item of a replayed dataset is described).
struct EngineUsers {
    emb: Array2<f32>,
    bias: Array1<f32>,
    /// `adapt::key` of every item's external id (the negatives' draw).
    keys: Vec<u64>,
    active: Vec<bool>,
    /// The inference graph (slots are item indexes) and the graph-neighbour
    /// weights per relation.
    pkg: crate::graph::Pkg,
    neighbour_weights: Vec<f32>,
    /// Fresh popularity per item and the fresh-item score's weight
    /// ([`train::fresh`]).
    fresh_pop: Array1<f32>,
    fresh_weight: f32,
    adapt: AdaptConfig,
    /// Per user: their training items in the order the stream delivers them.
    user_items: Vec<Vec<u32>>,
    /// `adapt::key` of every user's external id.
    user_keys: Vec<u64>,
    /// The negatives' pool of the catalogue ([`crate::adapt::negative_pool`]),
    /// as the engine draws it.
    pool: Option<Vec<u32>>,
}

impl EngineUsers {
    fn catalogue(&self) -> Catalogue<'_> {
        Catalogue {
            emb: self.emb.view(),
            bias: self.bias.view(),
            active: &self.active,
            keys: &self.keys,
            graph: Some((&self.pkg, &self.neighbour_weights)),
            fresh: Some((self.fresh_pop.view(), self.fresh_weight)),
            pool: self.pool.as_deref(),
        }
    }
}

impl Recommender for EngineUsers {
    fn score(&self, users: &[u32], mut out: ArrayViewMut2<'_, f32>) {
        let cat = self.catalogue();
        let d = self.emb.ncols();
        let vs: Vec<Array1<f32>> = users
            .iter()
            .map(|&u| {
                let u = u as usize;
                adapt_user(&cat, &self.user_items[u], self.user_keys[u], &self.adapt)
                    .unwrap_or_else(|| Array1::zeros(d))
            })
            .collect();
        let queries: Vec<(ndarray::ArrayView1<'_, f32>, &[u32])> = vs
            .iter()
            .zip(users)
            .map(|(v, &u)| (v.view(), self.user_items[u as usize].as_slice()))
            .collect();
        score_users(&cat, &queries, out.view_mut());
    }
}

/// Outer iterations of the aware mode's co-adaptation of the meta-learned
/// adaptation to a scenario.
const CO_ADAPT_ITERATIONS: usize = 60;

pub(super) fn err(e: impl std::fmt::Display) -> EvalError {
    EvalError::Model {
        model: "mpkg".into(),
        reason: e.to_string(),
    }
}

pub(super) fn fit(ctx: &FitContext<'_>) -> Result<Fitted> {
    let dir = ctx
        .model_dir
        .ok_or_else(|| err("needs --model-dir (a folder written by `thaw train`)"))?;
    let tm = TrainedModel::load(dir).map_err(err)?;
    let x = train::item_features(ctx.dataset, &tm.card.config, Some(&dir.join("cache")))
        .map_err(err)?;
    let (e_nrd, fused, pkg) = train::infer_items(ctx.dataset, &tm, &x, ctx.stream).map_err(err)?;
    let neighbour_weights = match ctx.neighbour_weights {
        Some(w) => {
            if let Some(bad) = w.keys().find(|k| !tm.card.relations.contains(k)) {
                return Err(err(format!(
                    "--neighbour-weight names {bad}, not one of the model's relations {:?}",
                    tm.card.relations
                )));
            }
            train::weights_for(w, &tm.card.relations)
        }
        None if ctx.scenario.is_some() => tm.card.aware_neighbour_weights.clone(),
        None => tm.card.neighbour_weights.clone(),
    };
    let fresh_weight = ctx.fresh_weight.unwrap_or(if ctx.scenario.is_some() {
        tm.card.aware_fresh_weight
    } else {
        tm.card.fresh_weight
    });
    let fresh_pop = fresh_popularity(ctx, dir, fresh_weight)?;
    // Per-item counts within the user's scenario (aware mode only).
    let (scenario, counts, adapt_on) = match ctx.scenario {
        None => (None, None, ctx.train.user_items.clone()),
        Some((s, tasks)) => {
            let mut counts = vec![0f32; ctx.train.n_items];
            let mut support = vec![Vec::new(); ctx.train.user_items.len()];
            for t in tasks {
                for &i in &t.support {
                    counts[i as usize] += 1.0;
                }
                support[t.user as usize] = t.support.clone();
            }
            (Some(s), Some(counts), support)
        }
    };
    let bf = train::bias_features(ctx.dataset, &ctx.train.user_items, counts.as_deref());
    // The blind mode scores with the trained layers as they are: fine-tuning
    // them again on all observed interactions was measured and changed
    // Recall@20 by less than 0.005 in every scenario.
    let (emb, bias_w, params) = if scenario.is_none() {
        let b = train::item_bias(&bf, &tm.card.bias_weights);
        (fused, b, json!({"adapted": false}))
    } else {
        let model = tm.model.clone_weights().map_err(err)?;
        let cfg = &tm.card.config.mpkg;
        let e = mpkg::stack_relations(
            &e_nrd
                .axis_iter(Axis(1))
                .map(|a| a.to_owned())
                .collect::<Vec<_>>(),
        )
        .map_err(err)?;
        let curve = model
            .finetune(
                &e,
                &mpkg::from_array2(bf.view()).map_err(err)?,
                &adapt_on,
                mpkg::FinetuneRun {
                    steps: cfg.adapt_steps,
                    lr: cfg.finetune_lr,
                    seed: cfg.seed ^ 0xada,
                },
                cfg,
            )
            .map_err(err)?;
        let fused = model.fuse_array(e_nrd.view()).map_err(err)?;
        let bw = model.bias_weights().map_err(err)?;
        let b = train::item_bias(&bf, &bw);
        (
            fused,
            b,
            json!({"adapted": scenario.map_or("all observed interactions", |s| s.name()), "bpr": curve, "bias_weights": bw}),
        )
    };
    let mut adapt = ctx
        .user_adapt
        .cloned()
        .unwrap_or_else(|| tm.card.user_adapt.clone());
    let mut user_items = vec![Vec::new(); ctx.train.user_items.len()];
    for &(u, i) in ctx.stream {
        user_items[u as usize].push(i);
    }
    let ds = ctx.dataset;
    let keys: Vec<u64> = (0..ds.n_items() as u32)
        .map(|i| key(ds.items.id(i)))
        .collect();
    let user_keys: Vec<u64> = (0..ds.users.len() as u32)
        .map(|u| key(ds.users.id(u)))
        .collect();
    // The aware mode co-adapts the meta-learned adaptation to the scenario
    // (MetaKG eq. 26): more meta-training on tasks cut from its support sets.
    let mut co_adapt = serde_json::Value::Null;
    if let (Some((_, tasks)), Some(meta)) = (ctx.scenario, adapt.meta.clone()) {
        let supports: Vec<(u64, Vec<u32>)> = tasks
            .iter()
            .map(|t| {
                let support: std::collections::HashSet<u32> = t.support.iter().copied().collect();
                let s: Vec<u32> = user_items[t.user as usize]
                    .iter()
                    .copied()
                    .filter(|i| support.contains(i))
                    .collect();
                (user_keys[t.user as usize], s)
            })
            .collect();
        let mcfg = crate::train::meta_adapt::MetaAdaptConfig {
            iterations: CO_ADAPT_ITERATIONS,
            eval_every: 10,
            ..tm.card.config.meta_adapt.clone()
        };
        let mtasks = crate::train::meta_adapt::support_tasks(&supports, 0.3, mcfg.seed);
        if mtasks.len() >= 10 {
            let cat = crate::train::meta_adapt::MetaCatalogue {
                emb: emb.view(),
                bias: bias_w.view(),
                keys: &keys,
                graph: Some((&pkg, &neighbour_weights)),
            };
            let m = crate::train::meta_adapt::train(&cat, &mtasks, &adapt, &mcfg, Some(&meta))
                .map_err(err)?;
            co_adapt = json!({"tasks": mtasks.len(), "held_out_query_loss": m.held_out});
            adapt.meta = Some(std::sync::Arc::new(m.meta));
        }
    }
    Ok(Fitted {
        rec: Box::new({
            let mut users = EngineUsers {
                emb,
                bias: bias_w,
                keys,
                active: vec![true; ds.n_items()],
                pkg,
                neighbour_weights: neighbour_weights.clone(),
                fresh_pop,
                fresh_weight,
                adapt: adapt.clone(),
                user_items,
                user_keys,
                pool: None,
            };
            // The engine's draw: a pool over the whole catalogue, then each
            // user's negatives within it.
            if adapt.negative_pool > 0 {
                users.pool = Some(crate::adapt::negative_pool(
                    &users.catalogue(),
                    adapt.negative_pool,
                ));
            }
            users
        }),
        params: json!({"model": tm.card.version, "relations": tm.card.relations, "bias_weights": tm.card.bias_weights, "neighbour_weights": neighbour_weights, "fresh_weight": fresh_weight, "user_adapt": adapt, "meta_adapt": adapt.meta.as_deref(), "co_adapt": co_adapt, "run": params}),
    })
}

/// Fresh popularity of every item from the training interactions: items the
/// model folder's trained-item list lacks are fresh. A model folder without
/// that list can only run with the term off.
fn fresh_popularity(
    ctx: &FitContext<'_>,
    dir: &std::path::Path,
    weight: f32,
) -> Result<Array1<f32>> {
    let n = ctx.train.n_items;
    let Some(trained) = train::read_trained_items(dir).map_err(err)? else {
        if weight != 0.0 {
            return Err(err(format!(
                "fresh-item weight {weight} but {} has no {}: retrain it with `thaw train`",
                dir.display(),
                train::fresh::TRAINED_ITEMS_FILE
            )));
        }
        return Ok(Array1::zeros(n));
    };
    let counts = ctx.train.item_counts();
    Ok(Array1::from_iter((0..n).map(|i| {
        let fresh = !trained.contains(ctx.dataset.items.id(i as u32));
        train::fresh::fresh_popularity(fresh, counts[i])
    })))
}
