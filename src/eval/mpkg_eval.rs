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
    /// The stream's `co_interacted` counts and the item-kNN weight.
    co: crate::graph::co::CoGraph,
    knn_weight: f32,
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
            knn: Some((&self.co, self.knn_weight)),
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
    let mut fresh_weight = ctx.fresh_weight.unwrap_or(if ctx.scenario.is_some() {
        tm.card.aware_fresh_weight
    } else {
        tm.card.fresh_weight
    });
    let mut knn_weight = ctx.knn_weight.unwrap_or(if ctx.scenario.is_some() {
        tm.card.aware_knn_weight
    } else {
        tm.card.knn_weight
    });
    let mut fresh_pop = fresh_popularity(ctx, dir, fresh_weight)?;
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
    // The item-kNN term's counts: the stream's, as the engine learns them.
    let co = crate::train::pkg_build::behavioural(
        &tm.card.config.pkg,
        ctx.stream,
        |i| key(ds.items.id(i)),
        None,
    )
    .0;
    // The aware mode chooses the item-kNN and fresh-item weights on the
    // scenario's support sets, unless they are given.
    let mut scenario_weights = serde_json::Value::Null;
    if let (Some((_, tasks)), None, None) = (ctx.scenario, ctx.knn_weight, ctx.fresh_weight) {
        let trained = train::read_trained_items(dir).map_err(err)?;
        let chooser = ScenarioWeights {
            ctx,
            tm: &tm,
            emb: &emb,
            bias: &bias_w,
            keys: &keys,
            neighbour_weights: &neighbour_weights,
            adapt: &adapt,
            user_items: &user_items,
            user_keys: &user_keys,
            trained: trained.as_ref(),
        };
        if let Some(c) = chooser.choose(tasks, (knn_weight, fresh_weight))? {
            knn_weight = c.knn;
            fresh_weight = c.fresh;
            fresh_pop = fresh_popularity(ctx, dir, fresh_weight)?;
            scenario_weights = c.report;
        }
    }
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
                knn: Some((&co, knn_weight)),
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
                co,
                knn_weight,
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
        params: json!({"model": tm.card.version, "relations": tm.card.relations, "bias_weights": tm.card.bias_weights, "neighbour_weights": neighbour_weights, "fresh_weight": fresh_weight, "knn_weight": knn_weight, "user_adapt": adapt, "meta_adapt": adapt.meta.as_deref(), "co_adapt": co_adapt, "scenario_weights": scenario_weights, "run": params}),
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

/// Item-kNN weights the aware mode tries per scenario.
const SCENARIO_KNN_GRID: [f32; 5] = [0.0, 128.0, 512.0, 2048.0, 8192.0];
/// Fresh-item weights the aware mode tries per scenario.
const SCENARIO_FRESH_GRID: [f32; 6] = [0.0, 32.0, 128.0, 512.0, 2048.0, 8192.0];
/// Share of each user's support set held out to choose them.
const SCENARIO_HELD_OUT: f64 = 0.3;

/// The aware mode's item-kNN and fresh-item weights for one scenario,
/// chosen on its support sets alone (never its query sets): a random 30%
/// of each user's support items is held out, the held-out interactions
/// leave the co-occurrence counts, the graph's behavioural edges and the
/// fresh popularity, and every pair of [`SCENARIO_KNN_GRID`] ×
/// [`SCENARIO_FRESH_GRID`] ranks the held-out items from the rest of the
/// user's items. The model's own aware weights are kept unless the pair
/// with the best mean NDCG@k beats them by more than two standard errors of
/// the per-user difference: a scenario whose held-out items say little (a
/// few users, short support sets) keeps them. The embeddings and biases keep the held-out items:
/// they were fine-tuned on the whole support sets, so the base score is
/// favoured a little over the two terms.
struct ScenarioWeights<'a> {
    ctx: &'a FitContext<'a>,
    tm: &'a TrainedModel,
    emb: &'a Array2<f32>,
    bias: &'a Array1<f32>,
    keys: &'a [u64],
    neighbour_weights: &'a [f32],
    adapt: &'a AdaptConfig,
    /// The user's training items, in stream order.
    user_items: &'a [Vec<u32>],
    user_keys: &'a [u64],
    /// Whether the model folder lists its trained items (the fresh term's
    /// condition); without it only a zero fresh weight is tried.
    trained: Option<&'a std::collections::HashSet<String>>,
}

/// The chosen weights and the mean NDCG of every pair tried.
struct Chosen {
    knn: f32,
    fresh: f32,
    report: serde_json::Value,
}

impl ScenarioWeights<'_> {
    fn choose(&self, tasks: &[super::split::Task], own: (f32, f32)) -> Result<Option<Chosen>> {
        let ctx = self.ctx;
        let ds = ctx.dataset;
        let supports: Vec<(u64, Vec<u32>)> = tasks
            .iter()
            .map(|t| {
                let support: std::collections::HashSet<u32> = t.support.iter().copied().collect();
                let items = self.user_items[t.user as usize]
                    .iter()
                    .copied()
                    .filter(|i| support.contains(i))
                    .collect();
                (self.user_keys[t.user as usize], items)
            })
            .collect();
        let user_of: std::collections::HashMap<u64, usize> = tasks
            .iter()
            .map(|t| (self.user_keys[t.user as usize], t.user as usize))
            .collect();
        let held = crate::train::meta_adapt::support_tasks(
            &supports,
            SCENARIO_HELD_OUT,
            ctx.seed ^ 0x5ce7,
        );
        if held.len() < 10 {
            return Ok(None);
        }
        let mut out: std::collections::HashSet<(u32, u32)> = std::collections::HashSet::new();
        for t in &held {
            let u = user_of[&t.user] as u32;
            out.extend(t.query.iter().map(|&i| (u, i)));
        }
        let stream: Vec<(u32, u32)> = ctx
            .stream
            .iter()
            .copied()
            .filter(|p| !out.contains(p))
            .collect();
        let pkg = train::inference_graph(ds, self.tm, &stream).map_err(err)?;
        let co = train::pkg_build::behavioural(
            &self.tm.card.config.pkg,
            &stream,
            |i| key(ds.items.id(i)),
            None,
        )
        .0;
        let mut counts = ctx.train.item_counts();
        for &(_, i) in &out {
            counts[i as usize] -= 1.0;
        }
        let pop = Array1::from_iter((0..ctx.train.n_items).map(|i| {
            let fresh = self
                .trained
                .is_some_and(|t| !t.contains(ds.items.id(i as u32)));
            train::fresh::fresh_popularity(fresh, counts[i])
        }));
        let fresh_grid: &[f32] = if self.trained.is_some() {
            &SCENARIO_FRESH_GRID
        } else {
            &SCENARIO_FRESH_GRID[..1]
        };
        let active = vec![true; ds.n_items()];
        let mut cat = Catalogue {
            emb: self.emb.view(),
            bias: self.bias.view(),
            active: &active,
            keys: self.keys,
            graph: Some((&pkg, self.neighbour_weights)),
            fresh: None,
            knn: None,
            pool: None,
        };
        let pool = (self.adapt.negative_pool > 0)
            .then(|| crate::adapt::negative_pool(&cat, self.adapt.negative_pool));
        cat.pool = pool.as_deref();
        let mut grid: Vec<(f32, f32)> = vec![own];
        grid.extend(
            SCENARIO_KNN_GRID
                .iter()
                .flat_map(|&k| fresh_grid.iter().map(move |&f| (k, f)))
                .filter(|&p| p != own),
        );
        // Per user, the NDCG of every pair.
        let mut per_user: Vec<Vec<f64>> = Vec::new();
        let n = ds.n_items();
        for t in &held {
            let u = user_of[&t.user];
            let hist: Vec<u32> = self.user_items[u]
                .iter()
                .copied()
                .filter(|i| !t.query.contains(i))
                .collect();
            let Some(v) = adapt_user(&cat, &hist, self.user_keys[u], self.adapt) else {
                continue;
            };
            let mut base = self.emb.dot(&v) + self.bias;
            pkg.add_neighbour_scores(self.neighbour_weights, &hist, base.view_mut());
            let mut knn = Array1::<f32>::zeros(n);
            co.add_similarity_scores(1.0, &hist, knn.view_mut());
            let mut fresh = Array1::<f32>::zeros(n);
            train::fresh::add_fresh_scores(1.0, pop.view(), &hist, fresh.view_mut());
            let mut seen = hist.clone();
            seen.sort_unstable();
            let excluded = |i: u32| seen.binary_search(&i).is_ok();
            let mut s = Array1::<f32>::zeros(n);
            let mut row = Vec::with_capacity(grid.len());
            for &(kw, fw) in &grid {
                ndarray::Zip::from(&mut s)
                    .and(&base)
                    .and(&knn)
                    .and(&fresh)
                    .for_each(|s, &b, &k, &f| *s = b + kw * k + fw * f);
                let m = super::metrics::user_metrics(
                    s.as_slice().expect("contiguous"),
                    excluded,
                    &t.query,
                    ctx.k,
                );
                row.push(m.ndcg);
            }
            per_user.push(row);
        }
        let users = per_user.len();
        if users < 2 {
            return Ok(None);
        }
        let mean = |g: usize| per_user.iter().map(|r| r[g]).sum::<f64>() / users as f64;
        let means: Vec<f64> = (0..grid.len()).map(mean).collect();
        let mut best = 0;
        for (g, &m) in means.iter().enumerate() {
            if m > means[best] {
                best = g;
            }
        }
        // Paired difference of the best pair and the model's own (index 0).
        let diffs: Vec<f64> = per_user.iter().map(|r| r[best] - r[0]).collect();
        let d = diffs.iter().sum::<f64>() / users as f64;
        let var = diffs.iter().map(|x| (x - d).powi(2)).sum::<f64>() / (users - 1) as f64;
        let se = (var / users as f64).sqrt();
        let kept = if d > 2.0 * se { best } else { 0 };
        let tried: Vec<serde_json::Value> = grid
            .iter()
            .zip(&means)
            .map(|(&(k, f), &m)| json!({"knn": k, "fresh": f, "ndcg": m}))
            .collect();
        let (knn, fresh) = grid[kept];
        Ok(Some(Chosen {
            knn,
            fresh,
            report: json!({"users": users, "held_out_share": SCENARIO_HELD_OUT, "own": {"knn": own.0, "fresh": own.1}, "best": {"knn": grid[best].0, "fresh": grid[best].1, "gain": d, "standard_error": se}, "knn_weight": knn, "fresh_weight": fresh, "tried": tried}),
        }))
    }
}
