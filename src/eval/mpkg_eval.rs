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
    /// The stream's `co_interacted` counts and the two kNN weights.
    co: crate::graph::co::CoGraph,
    knn_weights: crate::adapt::KnnWeights,
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
            knn: Some((&self.co, self.knn_weights)),
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
    let fresh_knn_weight = ctx.fresh_knn_weight.unwrap_or(if ctx.scenario.is_some() {
        tm.card.aware_fresh_knn_weight
    } else {
        tm.card.fresh_knn_weight
    });
    let mut fresh_pop = fresh_popularity(ctx, dir, fresh_weight.max(fresh_knn_weight))?;
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
            fresh_knn_weight,
            adapt: &adapt,
            user_items: &user_items,
            user_keys: &user_keys,
            trained: trained.as_ref(),
        };
        let supports: Vec<(u32, &[u32])> = tasks
            .iter()
            .map(|t| (t.user, t.support.as_slice()))
            .collect();
        if let Some(c) = chooser.choose(&supports, (knn_weight, fresh_weight))? {
            knn_weight = c.knn;
            fresh_weight = c.fresh;
            fresh_pop = fresh_popularity(ctx, dir, fresh_weight.max(fresh_knn_weight))?;
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
                knn_weights: crate::adapt::KnnWeights {
                    all: knn_weight,
                    fresh: fresh_knn_weight,
                },
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
        params: json!({"model": tm.card.version, "relations": tm.card.relations, "bias_weights": tm.card.bias_weights, "neighbour_weights": neighbour_weights, "fresh_weight": fresh_weight, "knn_weight": knn_weight, "fresh_knn_weight": fresh_knn_weight, "user_adapt": adapt, "meta_adapt": adapt.meta.as_deref(), "co_adapt": co_adapt, "scenario_weights": scenario_weights, "run": params}),
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
/// few users, short support sets) keeps them. The embeddings and biases
/// keep the held-out items: they were fine-tuned on the whole support sets,
/// so the base score is favoured a little over the two terms.
struct ScenarioWeights<'a> {
    ctx: &'a FitContext<'a>,
    tm: &'a TrainedModel,
    emb: &'a Array2<f32>,
    bias: &'a Array1<f32>,
    keys: &'a [u64],
    neighbour_weights: &'a [f32],
    /// The fresh-item kNN weight (fixed; part of the base score).
    fresh_knn_weight: f32,
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

/// The score terms' inputs without the held-out interactions.
struct Reduced {
    pkg: crate::graph::Pkg,
    co: crate::graph::co::CoGraph,
    pop: Array1<f32>,
}

/// One held-out task: a dense user index and the items held out.
type HeldOut = (usize, Vec<u32>);

impl ScenarioWeights<'_> {
    /// Chooses the weights from `supports`, `(dense user index, support
    /// items)` per user of the scenario (its query sets never reach here),
    /// with `own`, the model's `(item-kNN, fresh)` aware weights, as the
    /// default. `None` when the support sets are too few to hold out from.
    fn choose(&self, supports: &[(u32, &[u32])], own: (f32, f32)) -> Result<Option<Chosen>> {
        let held = self.held_out(supports);
        if held.len() < 10 {
            return Ok(None);
        }
        let reduced = self.without(&held)?;
        let fresh_grid: &[f32] = if self.trained.is_some() {
            &SCENARIO_FRESH_GRID
        } else {
            &SCENARIO_FRESH_GRID[..1]
        };
        let mut grid: Vec<(f32, f32)> = vec![own];
        grid.extend(
            SCENARIO_KNN_GRID
                .iter()
                .flat_map(|&k| fresh_grid.iter().map(move |&f| (k, f)))
                .filter(|&p| p != own),
        );
        let rows = self.ndcg_rows(&reduced, &held, &grid);
        let Some(p) = pick(&rows) else {
            return Ok(None);
        };
        let tried: Vec<serde_json::Value> = grid
            .iter()
            .zip(&p.means)
            .map(|(&(k, f), &m)| json!({"knn": k, "fresh": f, "ndcg": m}))
            .collect();
        let (knn, fresh) = grid[p.kept];
        Ok(Some(Chosen {
            knn,
            fresh,
            report: json!({
                "users": rows.len(),
                "held_out_share": SCENARIO_HELD_OUT,
                "own": {"knn": own.0, "fresh": own.1},
                "best": {"knn": grid[p.best].0, "fresh": grid[p.best].1, "gain": p.gain, "standard_error": p.se},
                "knn_weight": knn,
                "fresh_weight": fresh,
                "tried": tried,
            }),
        }))
    }

    /// A seeded [`SCENARIO_HELD_OUT`] of each user's support items (in
    /// stream order), as the co-adaptation cuts its tasks.
    fn held_out(&self, supports: &[(u32, &[u32])]) -> Vec<HeldOut> {
        let keyed: Vec<(u64, Vec<u32>)> = supports
            .iter()
            .map(|&(u, support)| {
                let support: std::collections::HashSet<u32> = support.iter().copied().collect();
                let items = self.user_items[u as usize]
                    .iter()
                    .copied()
                    .filter(|i| support.contains(i))
                    .collect();
                (self.user_keys[u as usize], items)
            })
            .collect();
        let user_of: std::collections::HashMap<u64, usize> = supports
            .iter()
            .map(|&(u, _)| (self.user_keys[u as usize], u as usize))
            .collect();
        crate::train::meta_adapt::support_tasks(&keyed, SCENARIO_HELD_OUT, self.ctx.seed ^ 0x5ce7)
            .into_iter()
            .map(|t| (user_of[&t.user], t.query))
            .collect()
    }

    /// The graph, the co-occurrence counts and the fresh popularity of the
    /// training stream without the held-out interactions.
    fn without(&self, held: &[HeldOut]) -> Result<Reduced> {
        let ds = self.ctx.dataset;
        let out: std::collections::HashSet<(u32, u32)> = held
            .iter()
            .flat_map(|(u, q)| q.iter().map(move |&i| (*u as u32, i)))
            .collect();
        let stream: Vec<(u32, u32)> = self
            .ctx
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
        let mut counts = self.ctx.train.item_counts();
        for &(_, i) in &out {
            counts[i as usize] -= 1.0;
        }
        let pop = Array1::from_iter((0..self.ctx.train.n_items).map(|i| {
            let fresh = self
                .trained
                .is_some_and(|t| !t.contains(ds.items.id(i as u32)));
            train::fresh::fresh_popularity(fresh, counts[i])
        }));
        Ok(Reduced { pkg, co, pop })
    }

    /// Per held-out user (who can be adapted), the NDCG@k of their held-out
    /// items under every `(item-kNN, fresh)` pair of `grid`. The score is
    /// linear in the two weights, so each term is computed once per user.
    fn ndcg_rows(&self, r: &Reduced, held: &[HeldOut], grid: &[(f32, f32)]) -> Vec<Vec<f64>> {
        let n = self.ctx.dataset.n_items();
        let active = vec![true; n];
        let mut cat = Catalogue {
            emb: self.emb.view(),
            bias: self.bias.view(),
            active: &active,
            keys: self.keys,
            graph: Some((&r.pkg, self.neighbour_weights)),
            fresh: None,
            knn: None,
            pool: None,
        };
        let pool = (self.adapt.negative_pool > 0)
            .then(|| crate::adapt::negative_pool(&cat, self.adapt.negative_pool));
        cat.pool = pool.as_deref();
        let mut rows = Vec::with_capacity(held.len());
        for (u, query) in held {
            let hist: Vec<u32> = self.user_items[*u]
                .iter()
                .copied()
                .filter(|i| !query.contains(i))
                .collect();
            let Some(v) = adapt_user(&cat, &hist, self.user_keys[*u], self.adapt) else {
                continue;
            };
            let mut base = self.emb.dot(&v) + self.bias;
            r.pkg
                .add_neighbour_scores(self.neighbour_weights, &hist, base.view_mut());
            crate::adapt::add_fresh_knn_scores(
                &r.co,
                self.fresh_knn_weight,
                r.pop.view(),
                &hist,
                base.view_mut(),
            );
            let mut knn = Array1::<f32>::zeros(n);
            r.co.add_similarity_scores(1.0, &hist, knn.view_mut());
            let mut fresh = Array1::<f32>::zeros(n);
            train::fresh::add_fresh_scores(1.0, r.pop.view(), &hist, fresh.view_mut());
            let mut seen = hist;
            seen.sort_unstable();
            let excluded = |i: u32| seen.binary_search(&i).is_ok();
            let mut s = Array1::<f32>::zeros(n);
            let row = grid
                .iter()
                .map(|&(kw, fw)| {
                    ndarray::Zip::from(&mut s)
                        .and(&base)
                        .and(&knn)
                        .and(&fresh)
                        .for_each(|s, &b, &k, &f| *s = b + kw * k + fw * f);
                    let s = s.as_slice().expect("contiguous");
                    super::metrics::user_metrics(s, excluded, query, self.ctx.k).ndcg
                })
                .collect();
            rows.push(row);
        }
        rows
    }
}

/// The outcome of [`pick`].
#[derive(Debug, PartialEq)]
struct Pick {
    /// Mean of every column.
    means: Vec<f64>,
    /// The column with the best mean (the first of equals).
    best: usize,
    /// `best` if it beats column 0 by more than two standard errors of the
    /// per-row difference, else 0.
    kept: usize,
    /// The mean difference of `best` and column 0, and its standard error.
    gain: f64,
    se: f64,
}

/// Picks a column of `rows` (one row per user, one column per candidate,
/// column 0 the default): the best mean, kept over the default only when
/// the paired difference exceeds two standard errors. `None` for fewer than
/// two rows.
fn pick(rows: &[Vec<f64>]) -> Option<Pick> {
    let users = rows.len();
    let cols = rows.first()?.len();
    if users < 2 || cols == 0 {
        return None;
    }
    let means: Vec<f64> = (0..cols)
        .map(|g| rows.iter().map(|r| r[g]).sum::<f64>() / users as f64)
        .collect();
    let mut best = 0;
    for (g, &m) in means.iter().enumerate() {
        if m > means[best] {
            best = g;
        }
    }
    let diffs: Vec<f64> = rows.iter().map(|r| r[best] - r[0]).collect();
    let gain = diffs.iter().sum::<f64>() / users as f64;
    let var = diffs.iter().map(|x| (x - gain).powi(2)).sum::<f64>() / (users - 1) as f64;
    let se = (var / users as f64).sqrt();
    let kept = if gain > 2.0 * se { best } else { 0 };
    Some(Pick {
        means,
        best,
        kept,
        gain,
        se,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_kept_without_a_clear_gain() {
        // No signal at all: every candidate ties, the default stays.
        let flat = vec![vec![0.0; 4]; 10];
        let p = pick(&flat).unwrap();
        assert_eq!((p.best, p.kept), (0, 0));
        // A gain in every row: the best is kept.
        let clear: Vec<Vec<f64>> = (0..20)
            .map(|u| vec![0.2, 0.3 + 0.001 * u as f64, 0.25])
            .collect();
        let p = pick(&clear).unwrap();
        assert_eq!((p.best, p.kept), (1, 1));
        // A better mean from one lucky row among many: noise, the default stays.
        let mut noisy = vec![vec![0.3, 0.3]; 20];
        noisy[0][1] = 0.9;
        noisy[1][1] = 0.1;
        let p = pick(&noisy).unwrap();
        assert_eq!(p.best, 1);
        assert_eq!(p.kept, 0, "{p:?}");
        assert!(pick(&[vec![0.1, 0.2]]).is_none());
        assert!(pick(&[]).is_none());
    }
}
