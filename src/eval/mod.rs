//! Offline evaluation: the cold-start protocol, metrics, baselines and reports.
//!
//! `thaw eval` trains a model on the split's training data (meta-training
//! interactions plus every scenario's support sets; the query sets are the only
//! hidden data), scores every item for every query user, excludes what the user
//! has in training data, and reports Recall@K, NDCG@K and MRR with 95% bootstrap
//! intervals per scenario.
//!
//! Two modes, never mixed in one table:
//! - *blind* (default, what a live stream sees): one model for everyone, not
//!   told which scenario a user is in;
//! - *aware* (MetaKG's setting): a model may use the user's scenario and that
//!   scenario's support sets as adaptation data.

pub mod baselines;
pub mod knowledge;
pub mod metrics;
mod mpkg_eval;
pub mod registry;
pub mod report;
pub mod split;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array2, ArrayViewMut2};
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, DatasetError};
use metrics::{user_metrics, ScenarioMetrics, UserMetrics};
use report::Report;
use split::{Scenario, Split, SplitError, Task};

/// Errors of the evaluation layer.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading the dataset failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Reading or building the split failed.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// A model cannot run with what it was given.
    #[error("model {model}: {reason}")]
    Model {
        /// The model name.
        model: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// Reports disagree or cannot be read.
    #[error("report {path}: {reason}")]
    Report {
        /// The report file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing an output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Evaluation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One model for every user, not told the scenario.
    Blind,
    /// A model may adapt to each scenario's support sets.
    Aware,
}

impl Mode {
    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Blind => "blind",
            Mode::Aware => "aware",
        }
    }
}

/// Training data of a split: per dense user, their sorted distinct items from
/// meta-training and from every scenario's support set.
#[derive(Debug, Clone)]
pub struct TrainSet {
    /// Number of items in the catalogue (all of the dataset's items).
    pub n_items: usize,
    /// Per dense user index (all of the dataset's users), sorted distinct items.
    pub user_items: Vec<Vec<u32>>,
}

impl TrainSet {
    /// Meta-training interactions plus all support sets of `split`.
    pub fn from_split(split: &Split, n_users: usize, n_items: usize) -> Self {
        let mut user_items = vec![Vec::new(); n_users];
        for (u, its) in &split.meta_training {
            user_items[*u as usize].extend_from_slice(its);
        }
        for tasks in split.scenarios.values() {
            for t in tasks {
                user_items[t.user as usize].extend_from_slice(&t.support);
            }
        }
        for its in &mut user_items {
            its.sort_unstable();
            its.dedup();
        }
        Self {
            n_items,
            user_items,
        }
    }

    /// Training interactions per item.
    pub fn item_counts(&self) -> Vec<f32> {
        let mut c = vec![0f32; self.n_items];
        for its in &self.user_items {
            for &i in its {
                c[i as usize] += 1.0;
            }
        }
        c
    }

    /// All (user, item) training pairs.
    pub fn pairs(&self) -> Vec<(u32, u32)> {
        self.user_items
            .iter()
            .enumerate()
            .flat_map(|(u, its)| its.iter().map(move |&i| (u as u32, i)))
            .collect()
    }
}

/// A fitted model: scores every item for a batch of users.
pub trait Recommender: Send + Sync {
    /// Writes scores into `out` (`users.len()` × items), row per user.
    fn score(&self, users: &[u32], out: ArrayViewMut2<'_, f32>);
}

/// What a model is fitted on.
pub struct FitContext<'a> {
    /// The dataset (item text, KG, links).
    pub dataset: &'a Dataset,
    /// Training interactions.
    pub train: &'a TrainSet,
    /// In the aware mode: the scenario being evaluated and its tasks, whose
    /// support sets are the adaptation data.
    pub scenario: Option<(Scenario, &'a [Task])>,
    /// The validation split, for choosing hyper-parameters.
    pub valid: Option<&'a Split>,
    /// The training interactions in the order a stream sees them
    /// (`crate::train::pkg_build::split_stream`): the PKG's behavioural
    /// relations are learnt in this order, as the engine learns them.
    pub stream: &'a [(u32, u32)],
    /// A model folder (trained models such as MPKG).
    pub model_dir: Option<&'a Path>,
    /// MPKG's graph-neighbour weights, when given instead of the model's.
    pub neighbour_weights: Option<&'a std::collections::BTreeMap<String, f32>>,
    /// MPKG's fresh-item weight, when given instead of the model's.
    pub fresh_weight: Option<f32>,
    /// MPKG's item-kNN weight, when given instead of the model's.
    pub knn_weight: Option<f32>,
    /// MPKG's fresh-item kNN weight, when given instead of the model's.
    pub fresh_knn_weight: Option<f32>,
    /// MPKG's per-user adaptation, when given instead of the model's.
    pub user_adapt: Option<&'a crate::adapt::AdaptConfig>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Cut-off of the metrics used for hyper-parameter choice.
    pub k: usize,
}

/// Users scored per batch: bounds the score buffer to 256 × items floats.
const BATCH: usize = 256;

/// Per-user metrics of `rec` on `tasks`.
pub fn evaluate_tasks(
    rec: &dyn Recommender,
    train: &TrainSet,
    tasks: &[Task],
    k: usize,
) -> Vec<UserMetrics> {
    evaluate_tasks_with_lists(rec, train, tasks, k, None)
}

/// [`evaluate_tasks`], also pushing each user's top-`k` list (best first,
/// the user's training and support items excluded, ties to the lower item)
/// onto `lists` when given.
pub fn evaluate_tasks_with_lists(
    rec: &dyn Recommender,
    train: &TrainSet,
    tasks: &[Task],
    k: usize,
    mut lists: Option<&mut Vec<Vec<u32>>>,
) -> Vec<UserMetrics> {
    let n = train.n_items;
    let mut out = Vec::with_capacity(tasks.len());
    let mut scores = Array2::<f32>::zeros((BATCH.min(tasks.len()).max(1), n));
    let mut mask = vec![false; n];
    for chunk in tasks.chunks(BATCH) {
        let users: Vec<u32> = chunk.iter().map(|t| t.user).collect();
        let mut view = scores.slice_mut(ndarray::s![..chunk.len(), ..]);
        view.fill(0.0);
        rec.score(&users, view);
        for (row, t) in chunk.iter().enumerate() {
            let seen = &train.user_items[t.user as usize];
            for &i in seen.iter().chain(&t.support) {
                mask[i as usize] = true;
            }
            let s = scores.row(row);
            let s = s
                .as_slice()
                .expect("rows of a standard-layout array are contiguous");
            out.push(user_metrics(s, |i| mask[i as usize], &t.query, k));
            if let Some(lists) = lists.as_deref_mut() {
                let top = metrics::top_k(s, k, |i| mask[i as usize]);
                lists.push(top.into_iter().map(|(i, _)| i).collect());
            }
            for &i in seen.iter().chain(&t.support) {
                mask[i as usize] = false;
            }
        }
    }
    out
}

/// Mean over scenarios of NDCG@k on the validation split, for hyper-parameter
/// choice: each scenario weighs the same, so the small cold-start scenarios are
/// not drowned by the large ones.
pub fn valid_ndcg(rec: &dyn Recommender, valid: &Split, train: &TrainSet, k: usize) -> f64 {
    let per: Vec<f64> = valid
        .scenarios
        .values()
        .filter(|t| !t.is_empty())
        .map(|tasks| {
            let m = evaluate_tasks(rec, train, tasks, k);
            m.iter().map(|m| m.ndcg).sum::<f64>() / m.len() as f64
        })
        .collect();
    if per.is_empty() {
        0.0
    } else {
        per.iter().sum::<f64>() / per.len() as f64
    }
}

/// Settings of one evaluation run.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Model name (see [`baselines::ModelName`]).
    pub model: baselines::ModelName,
    /// Blind or aware.
    pub mode: Mode,
    /// Cut-off K.
    pub k: usize,
    /// Seed for training and bootstrap.
    pub seed: u64,
    /// A trained model's folder, for models that need one.
    pub model_dir: Option<PathBuf>,
    /// MPKG only: graph-neighbour weights per relation name instead of the
    /// model's own (for choosing them on `valid/`).
    pub neighbour_weights: Option<std::collections::BTreeMap<String, f32>>,
    /// MPKG only: the fresh-item score's weight instead of the model's.
    pub fresh_weight: Option<f32>,
    /// MPKG only: the item-kNN score's weight instead of the model's.
    pub knn_weight: Option<f32>,
    /// MPKG only: the fresh-item kNN score's weight instead of the model's.
    pub fresh_knn_weight: Option<f32>,
    /// MPKG only: the per-user adaptation instead of the model's (the
    /// engine's, when it overrides the model's in its settings).
    pub user_adapt: Option<crate::adapt::AdaptConfig>,
}

/// Runs one evaluation: fit, score every scenario, aggregate.
pub fn run(ds: &Dataset, split: &Split, cfg: &EvalConfig) -> Result<Report> {
    Ok(run_with_lists(ds, split, cfg, false)?.0)
}

/// Top-`k` lists of one evaluation per scenario name, one per task in task
/// order (see [`evaluate_tasks_with_lists`]).
pub type Lists = std::collections::BTreeMap<String, Vec<Vec<u32>>>;

/// [`run`], also returning every query user's top-`k` list when `lists`
/// (for comparing the engine's published lists with offline evaluation).
pub fn run_with_lists(
    ds: &Dataset,
    split: &Split,
    cfg: &EvalConfig,
    lists: bool,
) -> Result<(Report, Lists)> {
    let mut all_lists = Lists::new();
    let start = Instant::now();
    let train = TrainSet::from_split(split, ds.users.len(), ds.n_items());
    let valid = split.valid.as_deref();
    let stream = crate::train::pkg_build::split_stream(ds, split);
    let ctx = |scenario| FitContext {
        dataset: ds,
        train: &train,
        scenario,
        valid,
        stream: &stream,
        model_dir: cfg.model_dir.as_deref(),
        neighbour_weights: cfg.neighbour_weights.as_ref(),
        fresh_weight: cfg.fresh_weight,
        knn_weight: cfg.knn_weight,
        fresh_knn_weight: cfg.fresh_knn_weight,
        user_adapt: cfg.user_adapt.as_ref(),
        seed: cfg.seed,
        k: cfg.k,
    };
    if cfg.mode == Mode::Blind && cfg.model.aware_only() {
        return Err(EvalError::Model {
            model: cfg.model.name().into(),
            reason: "exists only in the scenario-aware mode (--scenario-aware)".into(),
        });
    }
    let shared = if cfg.mode == Mode::Blind || !cfg.model.uses_scenario() {
        Some(baselines::fit(cfg.model, &ctx(None))?)
    } else {
        None
    };
    let mut params = serde_json::Map::new();
    if let Some(serde_json::Value::Object(m)) = shared.as_ref().map(|f| &f.params) {
        params = m.clone();
    }
    let mut scenarios = std::collections::BTreeMap::new();
    for (si, (s, tasks)) in split.scenarios.iter().enumerate() {
        let own;
        let fitted = match &shared {
            Some(f) => f,
            None => {
                own = baselines::fit(cfg.model, &ctx(Some((*s, tasks.as_slice()))))?;
                params.insert(s.name().into(), own.params.clone());
                &own
            }
        };
        let mut own_lists = Vec::new();
        let per_user = evaluate_tasks_with_lists(
            fitted.rec.as_ref(),
            &train,
            tasks,
            cfg.k,
            lists.then_some(&mut own_lists),
        );
        if lists {
            all_lists.insert(s.name().to_string(), own_lists);
        }
        let m = ScenarioMetrics::from_users(&per_user, cfg.seed ^ (si as u64 + 1));
        scenarios.insert(s.name().to_string(), m);
    }
    Ok((
        Report {
            model: cfg.model.name().into(),
            mode: cfg.mode,
            k: cfg.k,
            dataset: ds.digest.clone(),
            split: split.digest.clone(),
            seconds: start.elapsed().as_secs_f64(),
            scenarios,
            params: serde_json::Value::Object(params),
        },
        all_lists,
    ))
}
