//! MPKG in `thaw eval`: inductive item embeddings from a trained model folder,
//! users as the mean of their items' embeddings (eq. 15) plus the learned item
//! bias. In the aware mode the MRA layer and the bias are fine-tuned further on
//! the scenario's support sets (as MetaKG adapts per scenario).

use ndarray::{Array1, Array2, ArrayViewMut2, Axis};
use serde_json::json;

use super::baselines::Fitted;
use super::{EvalError, FitContext, Recommender, Result};
use crate::train::{self, mpkg, TrainedModel};

/// Users are the mean of their training items' fused embeddings.
struct MeanUser {
    emb: Array2<f32>,
    bias: Array1<f32>,
    user_items: Vec<Vec<u32>>,
    /// The inference graph (slots are item indexes) and the graph-neighbour
    /// weights per relation.
    pkg: crate::graph::Pkg,
    neighbour_weights: Vec<f32>,
    /// Fresh popularity per item and the fresh-item score's weight
    /// ([`train::fresh`]).
    fresh_pop: Array1<f32>,
    fresh_weight: f32,
}

impl Recommender for MeanUser {
    fn score(&self, users: &[u32], mut out: ArrayViewMut2<'_, f32>) {
        let d = self.emb.ncols();
        let mut eu = Array2::<f32>::zeros((users.len(), d));
        for (mut row, &u) in eu.rows_mut().into_iter().zip(users) {
            let its = &self.user_items[u as usize];
            for &i in its {
                row += &self.emb.row(i as usize);
            }
            if !its.is_empty() {
                row /= its.len() as f32;
            }
        }
        ndarray::linalg::general_mat_mul(1.0, &eu, &self.emb.t(), 0.0, &mut out);
        out += &self.bias;
        for (mut row, &u) in out.rows_mut().into_iter().zip(users) {
            self.pkg.add_neighbour_scores(
                &self.neighbour_weights,
                &self.user_items[u as usize],
                row.view_mut(),
            );
            train::fresh::add_fresh_scores(
                self.fresh_weight,
                self.fresh_pop.view(),
                &self.user_items[u as usize],
                row,
            );
        }
    }
}

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
    let (e_nrd, fused, pkg) =
        train::infer_items(ctx.dataset, &tm, &x, &ctx.train.user_items).map_err(err)?;
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
    Ok(Fitted {
        rec: Box::new(MeanUser {
            emb,
            bias: bias_w,
            user_items: ctx.train.user_items.clone(),
            pkg,
            neighbour_weights: neighbour_weights.clone(),
            fresh_pop,
            fresh_weight,
        }),
        params: json!({"model": tm.card.version, "relations": tm.card.relations, "bias_weights": tm.card.bias_weights, "neighbour_weights": neighbour_weights, "fresh_weight": fresh_weight, "run": params}),
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
