//! MPKG's knowledge-prediction task (`thaw eval --task knowledge`): PKG edges
//! held out from the graph, each to be found again by ranking every item
//! for its head and relation (MPKG §5, "knowledge prediction"), split by
//! whether the head is warm (in the training graph) or zero-shot (absent
//! from it, MPKG Def. 3).
//!
//! Protocol:
//! - the training graph is the one `thaw train` saw: meta-training
//!   interactions only, zero-shot items absent;
//! - the inference graph is evaluation's: every item, co-interaction
//!   relations from all training interactions (meta-training and supports);
//! - the candidates are the edges of the inference graph that the training
//!   graph lacks (so no candidate was seen in training): a query `(h, r, t)`
//!   for each direction whose head qualifies; a zero-shot query has a
//!   zero-shot head, a warm one two warm endpoints;
//! - up to `max_queries` of each kind are drawn (seeded) and their edges are
//!   removed from the inference graph; embeddings are computed inductively
//!   on what remains, so a held-out edge never shapes the embeddings that
//!   have to find it;
//! - each query ranks every item but the head, the head's remaining
//!   neighbours under `r` and its other held-out tails (the filtered
//!   setting), ties counted against the answer; Recall@K (hit) and MRR, with
//!   95% bootstrap intervals over queries.
//!
//! Scores: MPKG by the KR score of eq. 3, `E_r(h) · E_r(t)`; two references
//! on the same queries: the tail's degree under `r` (popularity) and the
//! cosine of the items' text vectors (content alone).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use ndarray::ArrayView1;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::metrics::{bootstrap_mean, Interval};
use super::mpkg_eval::err;
use super::split::Split;
use super::Result;
use crate::dataset::Dataset;
use crate::train::{self, pkg_build, TrainedModel};

/// Settings of the task.
#[derive(Debug, Clone)]
pub struct KnowledgeConfig {
    /// Cut-off of Recall@K.
    pub k: usize,
    /// Most queries of each head kind (warm, zero-shot).
    pub max_queries: usize,
    /// Seed of the draw and of the bootstrap.
    pub seed: u64,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        Self {
            k: 20,
            max_queries: 1000,
            seed: 2020,
        }
    }
}

/// Metrics of one scorer on one kind of head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    /// Queries.
    pub queries: usize,
    /// Recall@K: the share of queries whose tail ranks in the top K.
    pub recall: f64,
    /// Its 95% bootstrap interval.
    pub recall_ci: Interval,
    /// Mean reciprocal rank (full ranking).
    pub mrr: f64,
    /// Its 95% bootstrap interval.
    pub mrr_ci: Interval,
}

/// The report (`--out`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeReport {
    /// Always `knowledge_prediction`.
    pub task: String,
    /// Dataset name.
    pub dataset: String,
    /// Split digest.
    pub split: String,
    /// Model version.
    pub model: String,
    /// K.
    pub k: usize,
    /// The model's relations.
    pub relations: Vec<String>,
    /// Candidate edges (in the inference graph, not in the training graph),
    /// per head kind, before the draw.
    pub candidates: BTreeMap<String, usize>,
    /// Scorer (`mpkg`, `popularity`, `text`) to head kind (`warm`,
    /// `zero_shot`) to metrics.
    pub scores: BTreeMap<String, BTreeMap<String, HeadMetrics>>,
}

impl KnowledgeReport {
    /// A Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "knowledge prediction on {} (model {}, relations {}), Recall@{} / MRR, 95% intervals\n\n| scorer | warm heads | zero-shot heads |\n|---|---|---|\n",
            self.dataset,
            self.model,
            self.relations.join(", "),
            self.k
        );
        for (name, heads) in &self.scores {
            let cell = |kind: &str| {
                heads.get(kind).map_or("—".to_string(), |m| {
                    format!(
                        "{:.3} [{:.3}, {:.3}] / {:.3} ({} queries)",
                        m.recall, m.recall_ci[0], m.recall_ci[1], m.mrr, m.queries
                    )
                })
            };
            s += &format!("| {name} | {} | {} |\n", cell("warm"), cell("zero_shot"));
        }
        s
    }
}

/// One held-out edge as a query: head, relation, tail (dataset indexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Query {
    head: u32,
    relation: usize,
    tail: u32,
}

/// Rank of `tail` (1 = best) among the items not excluded, ties against it.
fn rank(scores: ArrayView1<'_, f32>, tail: u32, excluded: &HashSet<u32>) -> usize {
    let st = scores[tail as usize];
    let st = if st.is_nan() { f32::NEG_INFINITY } else { st };
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(j, &s)| {
            j as u32 != tail && !excluded.contains(&(j as u32)) && !(s.is_nan() || s < st)
        })
        .count()
}

/// Runs the task for the model in `model_dir` on `split`.
pub fn run(
    ds: &Dataset,
    split: &Split,
    model_dir: &Path,
    cfg: &KnowledgeConfig,
) -> Result<KnowledgeReport> {
    let tm = TrainedModel::load(model_dir).map_err(err)?;
    let pkg_cfg = &tm.card.config.pkg;
    let n = ds.n_items();

    // The training graph: meta-training only, zero-shot items absent.
    let (meta, warm_items) = train::meta_training(ds, split);
    let (g_train, slot_train) = pkg_build::build_pkg(
        ds,
        pkg_cfg,
        &warm_items,
        &pkg_build::stream_order(ds, &[&meta]),
    )
    .map_err(err)?;
    let item_of: HashMap<u32, u32> = slot_train.iter().map(|(&i, &s)| (s, i)).collect();
    let is_warm = |i: u32| slot_train.contains_key(&i);

    // The inference graph: every item, all training interactions.
    let mut g =
        train::inference_graph(ds, &tm, &pkg_build::split_stream(ds, split)).map_err(err)?;

    // Candidates: inference edges the training graph lacks.
    let mut seen: HashSet<(usize, u32, u32)> = HashSet::new();
    for r in 0..g_train.num_relations() {
        for (a, b) in g_train.edges(r).map_err(err)? {
            let (a, b) = (item_of[&a], item_of[&b]);
            seen.insert((r, a.min(b), a.max(b)));
        }
    }
    let mut warm: Vec<Query> = Vec::new();
    let mut zero: Vec<Query> = Vec::new();
    for r in 0..g.num_relations() {
        for (a, b) in g.edges(r).map_err(err)? {
            if seen.contains(&(r, a, b)) {
                continue;
            }
            for (h, t) in [(a, b), (b, a)] {
                let q = Query {
                    head: h,
                    relation: r,
                    tail: t,
                };
                match (is_warm(h), is_warm(t)) {
                    (false, _) => zero.push(q),
                    (true, true) => warm.push(q),
                    (true, false) => {}
                }
            }
        }
    }
    let mut candidates = BTreeMap::new();
    candidates.insert("warm".to_string(), warm.len());
    candidates.insert("zero_shot".to_string(), zero.len());
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for qs in [&mut warm, &mut zero] {
        qs.sort_unstable();
        qs.shuffle(&mut rng);
        qs.truncate(cfg.max_queries);
    }
    // Hold the drawn edges out of the graph the embeddings come from.
    for q in warm.iter().chain(&zero) {
        let _ = g.remove_edge(q.relation, q.head, q.tail).map_err(err)?;
    }
    let mut held: HashMap<(u32, usize), HashSet<u32>> = HashMap::new();
    for q in warm.iter().chain(&zero) {
        held.entry((q.head, q.relation)).or_default().insert(q.tail);
    }

    // Embeddings on what remains: E_r = S_r^M (X W_r).
    let x =
        train::item_features(ds, &tm.card.config, Some(&model_dir.join("cache"))).map_err(err)?;
    let e = train::relation_embeddings(&tm, &g, &x).map_err(err)?;
    // Text reference: unit text vectors (the features' leading columns).
    let text_dim = x.ncols().saturating_sub(tm.card.config.kg_dim);
    let mut text = x.slice(ndarray::s![.., ..text_dim]).to_owned();
    for mut row in text.rows_mut() {
        let norm = row.dot(&row).sqrt();
        if norm > 0.0 {
            row /= norm;
        }
    }

    // Per query, what its ranking leaves out: the head, its remaining
    // neighbours and its other held-out tails.
    let excluded_of = |q: &Query| -> Result<HashSet<u32>> {
        let mut excluded: HashSet<u32> = g
            .neighbours(q.relation, q.head)
            .map_err(err)?
            .iter()
            .copied()
            .collect();
        excluded.insert(q.head);
        if let Some(others) = held.get(&(q.head, q.relation)) {
            excluded.extend(others.iter().copied().filter(|&t| t != q.tail));
        }
        Ok(excluded)
    };
    let excluded: Vec<Vec<HashSet<u32>>> = [&warm, &zero]
        .into_iter()
        .map(|qs| qs.iter().map(excluded_of).collect::<Result<Vec<_>>>())
        .collect::<Result<_>>()?;
    // The popularity reference: each item's degree per relation.
    let degree: Vec<ndarray::Array1<f32>> = (0..g.num_relations())
        .map(|r| {
            (0..n as u32)
                .map(|j| g.degree(r, j).unwrap_or(0) as f32)
                .collect()
        })
        .collect();

    let mut scores = BTreeMap::new();
    for scorer in ["mpkg", "popularity", "text"] {
        let mut by_head = BTreeMap::new();
        for ((kind, qs), excluded) in [("warm", &warm), ("zero_shot", &zero)]
            .into_iter()
            .zip(&excluded)
        {
            if qs.is_empty() {
                continue;
            }
            let mut hits = Vec::with_capacity(qs.len());
            let mut rr = Vec::with_capacity(qs.len());
            for (q, excluded) in qs.iter().zip(excluded) {
                let r = q.relation;
                let s: ndarray::Array1<f32> = match scorer {
                    "mpkg" => e[r].dot(&e[r].row(q.head as usize)),
                    "popularity" => degree[r].clone(),
                    _ => text.dot(&text.row(q.head as usize)),
                };
                let k = rank(s.view(), q.tail, excluded);
                hits.push(if k <= cfg.k { 1.0 } else { 0.0 });
                rr.push(1.0 / k as f64);
            }
            let (recall, recall_ci) = bootstrap_mean(&hits, 1000, cfg.seed);
            let (mrr, mrr_ci) = bootstrap_mean(&rr, 1000, cfg.seed ^ 1);
            by_head.insert(
                kind.to_string(),
                HeadMetrics {
                    queries: qs.len(),
                    recall,
                    recall_ci,
                    mrr,
                    mrr_ci,
                },
            );
        }
        scores.insert(scorer.to_string(), by_head);
    }
    Ok(KnowledgeReport {
        task: "knowledge_prediction".into(),
        dataset: ds.name.clone(),
        split: split.digest.clone(),
        model: tm.card.version.clone(),
        k: cfg.k,
        relations: tm.card.relations.clone(),
        candidates,
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_ties_against_the_answer_and_skips_exclusions() {
        let s = ndarray::arr1(&[0.9f32, 0.5, 0.5, 0.1, f32::NAN]);
        let none = HashSet::new();
        assert_eq!(rank(s.view(), 1, &none), 3, "item 0 above, item 2 tied");
        assert_eq!(rank(s.view(), 0, &none), 1);
        let ex: HashSet<u32> = [0, 2].into_iter().collect();
        assert_eq!(rank(s.view(), 1, &ex), 1);
        // A NaN answer ranks below every number; NaN others never beat it.
        assert_eq!(rank(s.view(), 4, &none), 5);
        assert_eq!(rank(s.view(), 3, &none), 4);
    }
}
