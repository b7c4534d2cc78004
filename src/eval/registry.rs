//! The model registry of `thaw eval`: the names `--model` takes and the one
//! [`fit`] that builds each, from the baselines ([`super::baselines`]), MPKG
//! ([`super::mpkg_eval`]) and MetaKG ([`crate::train::metakg`]). The model
//! families depend on this module for [`Fitted`], never on each other.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde_json::json;

use super::{baselines, EvalError, FitContext, Recommender, Result};

/// The models `thaw eval --model` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelName {
    /// Popularity.
    Pop,
    /// Item-item collaborative kNN.
    ItemKnn,
    /// BPR matrix factorisation.
    Bpr,
    /// Item-item kNN over the knowledge graph.
    KgKnn,
    /// Item-item kNN over text-encoder vectors.
    ContentKnn,
    /// Popularity within the user's scenario (aware mode only).
    ScenarioPop,
    /// The MPKG item model (needs `--model-dir` from `thaw train`).
    Mpkg,
    /// MetaKG (meta-learning on the collaborative knowledge graph), trained
    /// inside `fit`; ablations through `THAW_METAKG_WITHOUT`.
    MetaKg,
}

impl ModelName {
    /// Every model, in report order.
    pub const ALL: [ModelName; 8] = [
        ModelName::Pop,
        ModelName::ItemKnn,
        ModelName::Bpr,
        ModelName::KgKnn,
        ModelName::ContentKnn,
        ModelName::ScenarioPop,
        ModelName::Mpkg,
        ModelName::MetaKg,
    ];

    /// The CLI and report name.
    pub fn name(self) -> &'static str {
        match self {
            ModelName::Pop => "pop",
            ModelName::ItemKnn => "itemknn",
            ModelName::Bpr => "bpr",
            ModelName::KgKnn => "kgknn",
            ModelName::ContentKnn => "contentknn",
            ModelName::ScenarioPop => "scenariopop",
            ModelName::Mpkg => "mpkg",
            ModelName::MetaKg => "metakg",
        }
    }

    /// Whether the model exists only in the scenario-aware mode.
    pub fn aware_only(self) -> bool {
        self == ModelName::ScenarioPop
    }

    /// Whether the model fits differently per scenario in the aware mode.
    pub fn uses_scenario(self) -> bool {
        matches!(
            self,
            ModelName::ScenarioPop | ModelName::Mpkg | ModelName::MetaKg
        )
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown model `{s}` (known: {})",
                    Self::ALL.map(|m| m.name()).join(", ")
                )
            })
    }
}

/// A fitted model and the hyper-parameters it ended with.
pub struct Fitted {
    /// The scorer.
    pub rec: Box<dyn Recommender>,
    /// Chosen hyper-parameters, for the report.
    pub params: serde_json::Value,
}

/// Fits `model` on `ctx`.
pub fn fit(model: ModelName, ctx: &FitContext<'_>) -> Result<Fitted> {
    match model {
        ModelName::Pop => Ok(Fitted {
            rec: Box::new(baselines::ItemScores(ctx.train.item_counts())),
            params: json!({}),
        }),
        ModelName::ScenarioPop => {
            let (_, tasks) = ctx.scenario.ok_or_else(|| EvalError::Model {
                model: model.name().into(),
                reason: "exists only in the scenario-aware mode (--scenario-aware)".into(),
            })?;
            let mut c = vec![0f32; ctx.train.n_items];
            for t in tasks {
                for &i in &t.support {
                    c[i as usize] += 1.0;
                }
            }
            Ok(Fitted {
                rec: Box::new(baselines::ItemScores(c)),
                params: json!({}),
            })
        }
        ModelName::ItemKnn => baselines::fit_knn(ctx, model, |train, _, k| {
            Ok(baselines::neighbours(
                &baselines::interaction_features(train),
                k,
            ))
        }),
        ModelName::KgKnn => {
            if ctx.dataset.triples.is_empty() {
                return Err(EvalError::Model {
                    model: model.name().into(),
                    reason: "the dataset has no .kg/.link files".into(),
                });
            }
            baselines::fit_knn(ctx, model, |_, ds, k| {
                Ok(baselines::neighbours(&baselines::kg_features(ds), k))
            })
        }
        ModelName::ContentKnn => {
            // --model-dir names the text encoder's folder (default models/text).
            let dir = ctx.model_dir.unwrap_or(Path::new("models/text"));
            let text = crate::train::text_vectors(ctx.dataset, dir, Some(&dir.join("cache")))
                .map_err(|e| EvalError::Model {
                    model: model.name().into(),
                    reason: format!("needs the text encoder's item vectors: {e}"),
                })?;
            baselines::fit_knn(ctx, model, |_, _, k| {
                Ok(baselines::dense_neighbours(&text, k))
            })
        }
        ModelName::Bpr => baselines::fit_bpr(ctx),
        ModelName::Mpkg => super::mpkg_eval::fit(ctx),
        ModelName::MetaKg => fit_metakg(ctx),
    }
}

// ---------------------------------------------------------------- MetaKG

/// Meta-trains MetaKG (once per process for the same data and settings; its
/// epoch count chosen on `valid/`) and, in the aware mode, co-adapts it to the
/// scenario's support sets (eq. 26).
fn fit_metakg(ctx: &FitContext<'_>) -> Result<Fitted> {
    use crate::train::metakg;
    let err = |reason: String| EvalError::Model {
        model: "metakg".into(),
        reason,
    };
    let cfg = metakg::MetaKgConfig::from_env().map_err(|e| err(e.to_string()))?;
    let valid = ctx.valid.ok_or_else(|| {
        err("chooses its epoch count on the split's valid/ folder, which is missing".into())
    })?;
    let (trainer, params) = metakg::meta_train(
        ctx.dataset,
        ctx.train,
        ctx.stream,
        valid,
        ctx.k,
        ctx.seed,
        &cfg,
    )
    .map_err(|e| err(e.to_string()))?;
    let rec = metakg::fitted(&trainer, ctx.scenario.map(|(_, t)| t), ctx.seed)
        .map_err(|e| err(e.to_string()))?;
    Ok(Fitted {
        rec: Box::new(rec),
        params,
    })
}
