//! The item model (MPKG) in ONNX Runtime: projection and fusion sessions.
//!
//! Two graphs exported by [`crate::train::export`] make an item's embedding,
//! with the graph stage's propagation between them:
//!
//! - `item_projection.onnx`, MPKG eq. 1's `X W_r` for every relation:
//!   `features [N, d_in] → projected [N, R, d]` ([`ItemModels::project`]);
//! - `item_fusion.onnx`, MPKG eq. 11's self-excitation over relations:
//!   `propagated [N, R, d] → embedding [N, d], relation_weights [N, R]`
//!   ([`ItemModels::fuse`]).
//!
//! Both are checked at load: names, float32, ranks, fixed `d_in`, `R` and `d`,
//! and the two graphs must agree on `R` and `d`. Sessions run on the CPU
//! execution provider; with the crate feature `cuda`, the CUDA provider is tried
//! first and [`ItemModels::provider`] tells which one was taken.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Ix2, Ix3};
use ort::session::{Session, SessionOutputs};
use ort::value::{Outlet, TensorElementType, TensorRef, ValueType};
use serde::{Deserialize, Serialize};

pub use crate::train::export::{
    EMBEDDING, FEATURES, FUSION_FILE, PROJECTED, PROJECTION_FILE, PROPAGATED, RELATION_WEIGHTS,
};

use super::{Error, Result};

/// [`ItemModels::provider`] when the sessions run on ONNX Runtime's CPU provider.
pub const CPU_PROVIDER: &str = "CPUExecutionProvider";
/// [`ItemModels::provider`] when the sessions run on the CUDA provider (crate
/// feature `cuda`).
pub const CUDA_PROVIDER: &str = "CUDAExecutionProvider";

/// Settings of the [`ItemModels`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ItemModelsConfig {
    /// Folder holding `item_projection.onnx` and `item_fusion.onnx`. Default
    /// `models/item`, beside the text encoder's `models/text`.
    pub model_dir: PathBuf,
    /// ONNX Runtime intra-op threads per session. Default 1: the graphs are a
    /// few small matrix products per batch, so more threads cost more in
    /// hand-offs than they save, and cores stay free for ingest and propagation.
    pub intra_threads: usize,
    /// The ONNX Runtime shared library. Default none: `ORT_DYLIB_PATH` if set,
    /// else the path written in `<model_dir>/ort_dylib_path` if that exists,
    /// else whatever library this process already loaded.
    pub ort_dylib: Option<PathBuf>,
}

impl Default for ItemModelsConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::from("models/item"),
            intra_threads: 1,
            ort_dylib: None,
        }
    }
}

impl ItemModelsConfig {
    /// Checks the ranges of the numeric settings.
    pub fn validate(&self) -> Result<()> {
        if self.intra_threads == 0 {
            return Err(Error::Config(
                "item models intra_threads must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// The dimensions fixed by the loaded graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    /// Item feature width.
    d_in: usize,
    /// Number of relations R.
    relations: usize,
    /// Embedding width d.
    dim: usize,
}

/// MPKG's item projection and fusion graphs in ONNX Runtime.
pub struct ItemModels {
    /// `Session::run` takes `&mut self` (ort 2.0.0-rc.15); a std Mutex is fine
    /// because a run is short blocking CPU work that callers keep off the async
    /// workers, and the lock is never held across an `.await`.
    projection: Mutex<Session>,
    /// As `projection`.
    fusion: Mutex<Session>,
    projection_path: PathBuf,
    fusion_path: PathBuf,
    provider: &'static str,
    dims: Dims,
}

impl std::fmt::Debug for ItemModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemModels")
            .field("projection_path", &self.projection_path)
            .field("fusion_path", &self.fusion_path)
            .field("provider", &self.provider)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl ItemModels {
    /// Loads both graphs from `cfg.model_dir`, initialising ONNX Runtime first
    /// if needed, and checks their inputs and outputs.
    pub fn load(cfg: &ItemModelsConfig) -> Result<Self> {
        cfg.validate()?;
        let projection_path = cfg.model_dir.join(PROJECTION_FILE);
        let fusion_path = cfg.model_dir.join(FUSION_FILE);
        for path in [&projection_path, &fusion_path] {
            if !path.is_file() {
                return Err(Error::Io {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "item model missing: export it with `thaw train`",
                    ),
                });
            }
        }

        let env = super::environment_for(cfg.ort_dylib.as_deref(), &cfg.model_dir)?;

        let (projection, provider) =
            super::session(env, &projection_path, cfg.intra_threads, true)?;
        // The fusion graph follows the projection's provider: if CUDA could not
        // take the first, it will not take the second.
        let (fusion, provider) = super::session(
            env,
            &fusion_path,
            cfg.intra_threads,
            provider == CUDA_PROVIDER,
        )?;

        let (d_in, relations, dim) = check_projection(&projection, &projection_path)?;
        let (fusion_relations, fusion_dim) = check_fusion(&fusion, &fusion_path)?;
        if (fusion_relations, fusion_dim) != (relations, dim) {
            return Err(Error::Interface {
                path: fusion_path,
                detail: format!(
                    "it takes `{PROPAGATED}` [N, {fusion_relations}, {fusion_dim}] but {} gives \
                     `{PROJECTED}` [N, {relations}, {dim}]: the two graphs are not from one model",
                    projection_path.display()
                ),
            });
        }
        tracing::info!(
            projection = %projection_path.display(),
            fusion = %fusion_path.display(),
            provider,
            d_in,
            relations,
            dim,
            intra_threads = cfg.intra_threads,
            "item models loaded"
        );
        Ok(Self {
            projection: Mutex::new(projection),
            fusion: Mutex::new(fusion),
            projection_path,
            fusion_path,
            provider,
            dims: Dims {
                d_in,
                relations,
                dim,
            },
        })
    }

    /// The execution provider both sessions run on: [`CPU_PROVIDER`] or
    /// [`CUDA_PROVIDER`].
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Width of the item features the projection takes (`d_in`).
    pub fn d_in(&self) -> usize {
        self.dims.d_in
    }

    /// Number of relations R.
    pub fn relations(&self) -> usize {
        self.dims.relations
    }

    /// Embedding width d.
    pub fn dim(&self) -> usize {
        self.dims.dim
    }

    /// MPKG eq. 1's projection: `features [N, d_in]` → `[N, R, d]`, row
    /// `[n, r, :]` = `features[n, :] · W_r`. Blocking CPU (or GPU) work: call it
    /// from a blocking thread.
    pub fn project(&self, features: ArrayView2<f32>) -> Result<Array3<f32>> {
        let Dims {
            d_in,
            relations,
            dim,
        } = self.dims;
        let items = features.nrows();
        if features.ncols() != d_in {
            return Err(bad_input(
                &self.projection_path,
                FEATURES,
                features.shape(),
                &format!("[N, {d_in}]"),
            ));
        }
        if items == 0 {
            return Ok(Array3::zeros((0, relations, dim)));
        }
        let features = features.as_standard_layout();
        let mut session = self
            .projection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let outputs =
            session.run(ort::inputs![FEATURES => TensorRef::from_array_view(&features)?])?;
        let projected = extract(&outputs, PROJECTED, &[items, relations, dim])?;
        projected.into_dimensionality::<Ix3>().map_err(shape_error)
    }

    /// MPKG eq. 11's self-excitation layer: `propagated [N, R, d]` →
    /// `(embedding [N, d], relation_weights [N, R])`, each weights row a softmax
    /// over relations. Blocking CPU (or GPU) work: call it from a blocking thread.
    pub fn fuse(&self, propagated: ArrayView3<f32>) -> Result<(Array2<f32>, Array2<f32>)> {
        let Dims { relations, dim, .. } = self.dims;
        let (items, got_relations, got_dim) = propagated.dim();
        if (got_relations, got_dim) != (relations, dim) {
            return Err(bad_input(
                &self.fusion_path,
                PROPAGATED,
                propagated.shape(),
                &format!("[N, {relations}, {dim}]"),
            ));
        }
        if items == 0 {
            return Ok((Array2::zeros((0, dim)), Array2::zeros((0, relations))));
        }
        let propagated = propagated.as_standard_layout();
        let mut session = self.fusion.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs =
            session.run(ort::inputs![PROPAGATED => TensorRef::from_array_view(&propagated)?])?;
        let embedding = extract(&outputs, EMBEDDING, &[items, dim])?;
        let weights = extract(&outputs, RELATION_WEIGHTS, &[items, relations])?;
        Ok((
            embedding
                .into_dimensionality::<Ix2>()
                .map_err(shape_error)?,
            weights.into_dimensionality::<Ix2>().map_err(shape_error)?,
        ))
    }
}

/// An input array that does not fit the graph's declared input.
fn bad_input(path: &Path, name: &str, got: &[usize], expected: &str) -> Error {
    Error::Interface {
        path: path.to_path_buf(),
        detail: format!("input `{name}` must be {expected}, was given an array of shape {got:?}"),
    }
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::Output(e.to_string())
}

/// The output `name`, copied out of ONNX Runtime's buffer, checked to be of
/// shape `expected`.
fn extract(
    outputs: &SessionOutputs<'_>,
    name: &str,
    expected: &[usize],
) -> Result<ndarray::ArrayD<f32>> {
    let value = outputs
        .get(name)
        .ok_or_else(|| Error::Output(format!("no `{name}` in the session's outputs")))?;
    let array = value.try_extract_array::<f32>()?;
    if array.shape() != expected {
        return Err(Error::Output(format!(
            "`{name}` has shape {:?}, expected {expected:?}",
            array.shape()
        )));
    }
    Ok(array.to_owned())
}

/// Names and types of `outlets`, for error messages.
fn describe(outlets: &[Outlet]) -> String {
    outlets
        .iter()
        .map(|o| format!("{}: {}", o.name(), o.dtype()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fixed dimensions of the float32 tensor `name` among `outlets`, which must
/// have rank `rank` and, but for the first (batch) axis, fixed positive sizes.
fn fixed_dims(
    outlets: &[Outlet],
    kind: &str,
    name: &str,
    rank: usize,
    path: &Path,
) -> Result<Vec<usize>> {
    let mismatch = |detail: String| Error::Interface {
        path: path.to_path_buf(),
        detail,
    };
    let outlet = outlets
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| mismatch(format!("no {kind} `{name}`, found [{}]", describe(outlets))))?;
    let shape = match outlet.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == rank => shape,
        other => {
            return Err(mismatch(format!(
                "{kind} `{name}` must be a float32 tensor of rank {rank}, found {other}"
            )))
        }
    };
    shape[1..]
        .iter()
        .map(|&d| {
            usize::try_from(d).ok().filter(|&d| d > 0).ok_or_else(|| {
                mismatch(format!(
                    "{kind} `{name}` must have fixed sizes after the batch axis, found {:?}",
                    &shape[..]
                ))
            })
        })
        .collect()
}

/// Requires exactly one input, named `name`.
fn single_input(session: &Session, name: &str, path: &Path) -> Result<()> {
    let inputs = session.inputs();
    if inputs.len() != 1 || inputs[0].name() != name {
        return Err(Error::Interface {
            path: path.to_path_buf(),
            detail: format!(
                "inputs must be exactly `{name}`, found [{}]",
                describe(inputs)
            ),
        });
    }
    Ok(())
}

/// Checks the projection graph; returns `(d_in, R, d)`.
fn check_projection(session: &Session, path: &Path) -> Result<(usize, usize, usize)> {
    single_input(session, FEATURES, path)?;
    let input = fixed_dims(session.inputs(), "input", FEATURES, 2, path)?;
    let output = fixed_dims(session.outputs(), "output", PROJECTED, 3, path)?;
    Ok((input[0], output[0], output[1]))
}

/// Checks the fusion graph; returns `(R, d)`.
fn check_fusion(session: &Session, path: &Path) -> Result<(usize, usize)> {
    single_input(session, PROPAGATED, path)?;
    let input = fixed_dims(session.inputs(), "input", PROPAGATED, 3, path)?;
    let (relations, dim) = (input[0], input[1]);
    let embedding = fixed_dims(session.outputs(), "output", EMBEDDING, 2, path)?;
    let weights = fixed_dims(session.outputs(), "output", RELATION_WEIGHTS, 2, path)?;
    if embedding[0] != dim || weights[0] != relations {
        return Err(Error::Interface {
            path: path.to_path_buf(),
            detail: format!(
                "outputs `{EMBEDDING}` [N, {}] and `{RELATION_WEIGHTS}` [N, {}] do not match \
                 input `{PROPAGATED}` [N, {relations}, {dim}]",
                embedding[0], weights[0]
            ),
        });
    }
    Ok((relations, dim))
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Axis};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::train::export::{
        fusion_reference, item_fusion_model, item_projection_model, projection_reference,
    };

    const R: usize = 3;
    const D_IN: usize = 7;
    const D: usize = 4;
    const H: usize = 5;
    const N: usize = 11;

    /// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the path `onnx/setup.sh`
    /// recorded in `models/text/ort_dylib_path`. Fails (no silent skip) when
    /// neither names an existing file.
    fn ort_dylib() -> PathBuf {
        if let Some(path) = std::env::var_os(super::super::ORT_DYLIB_ENV).filter(|v| !v.is_empty())
        {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "ORT_DYLIB_PATH={} is not a file: run onnx/setup.sh, it prints the path",
                path.display()
            );
            return path;
        }
        let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/text/ort_dylib_path");
        let text = std::fs::read_to_string(&recorded).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run onnx/setup.sh to install ONNX Runtime",
                recorded.display()
            )
        });
        let path = PathBuf::from(text.trim());
        assert!(
            path.is_file(),
            "ONNX Runtime library {} (from {}) does not exist: run onnx/setup.sh",
            path.display(),
            recorded.display()
        );
        path
    }

    struct Weights {
        proj_w: Array3<f32>,
        w1: Array3<f32>,
        b1: Array2<f32>,
        w2: Array2<f32>,
        b2: Array1<f32>,
    }

    fn uniform(rng: &mut ChaCha8Rng) -> f32 {
        rng.random_range(-1.0f32..1.0)
    }

    fn weights(seed: u64, relations: usize) -> Weights {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Weights {
            proj_w: Array3::from_shape_simple_fn((relations, D_IN, D), || uniform(&mut rng)),
            w1: Array3::from_shape_simple_fn((relations, D, H), || uniform(&mut rng)),
            b1: Array2::from_shape_simple_fn((relations, H), || uniform(&mut rng)),
            w2: Array2::from_shape_simple_fn((relations, H), || uniform(&mut rng)),
            b2: Array1::from_shape_simple_fn(relations, || uniform(&mut rng)),
        }
    }

    /// Writes both graphs of `w` into a fresh folder.
    fn export(w: &Weights) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let projection = item_projection_model(w.proj_w.view()).unwrap();
        let fusion = item_fusion_model(w.w1.view(), w.b1.view(), w.w2.view(), w.b2.view()).unwrap();
        std::fs::write(dir.path().join(PROJECTION_FILE), projection).unwrap();
        std::fs::write(dir.path().join(FUSION_FILE), fusion).unwrap();
        dir
    }

    fn config(dir: &Path) -> ItemModelsConfig {
        ItemModelsConfig {
            model_dir: dir.to_path_buf(),
            ort_dylib: Some(ort_dylib()),
            ..ItemModelsConfig::default()
        }
    }

    fn load(dir: &Path) -> ItemModels {
        ItemModels::load(&config(dir)).unwrap_or_else(|e| panic!("loading the item models: {e}"))
    }

    fn max_abs_diff<D: ndarray::Dimension>(
        a: &ndarray::Array<f32, D>,
        b: &ndarray::Array<f32, D>,
    ) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn onnx_runtime_matches_the_ndarray_reference() {
        let w = weights(42, R);
        let dir = export(&w);
        let models = load(dir.path());
        assert_eq!(
            (models.d_in(), models.relations(), models.dim()),
            (D_IN, R, D)
        );
        #[cfg(not(feature = "cuda"))]
        assert_eq!(models.provider(), CPU_PROVIDER);
        #[cfg(feature = "cuda")]
        assert!([CPU_PROVIDER, CUDA_PROVIDER].contains(&models.provider()));

        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let features = Array2::from_shape_simple_fn((N, D_IN), || uniform(&mut rng));
        let projected = models.project(features.view()).unwrap();
        let want = projection_reference(features.view(), w.proj_w.view());
        let diff = max_abs_diff(&projected, &want);
        println!("projected: max abs diff ORT vs reference {diff:.3e}");
        assert!(diff <= 1e-5, "projected: {diff:.3e} > 1e-5");

        // Scaled up so the softmax is far from uniform and relu cuts some units.
        let propagated = projected.mapv(|v| 2.0 * v);
        let (embedding, weights) = models.fuse(propagated.view()).unwrap();
        let (want_embedding, want_weights) = fusion_reference(
            propagated.view(),
            w.w1.view(),
            w.b1.view(),
            w.w2.view(),
            w.b2.view(),
        );
        let diff_e = max_abs_diff(&embedding, &want_embedding);
        let diff_w = max_abs_diff(&weights, &want_weights);
        println!("embedding: {diff_e:.3e}, relation_weights: {diff_w:.3e}");
        assert!(diff_e <= 1e-5, "embedding: {diff_e:.3e} > 1e-5");
        assert!(diff_w <= 1e-5, "relation_weights: {diff_w:.3e} > 1e-5");
        for (n, sum) in weights.sum_axis(Axis(1)).iter().enumerate() {
            assert!((sum - 1.0).abs() <= 1e-5, "item {n}: weights sum to {sum}");
        }
        // The weights are not trivially uniform: the test would miss a broken softmax.
        let spread = weights.fold(0.0f32, |m, &v| m.max((v - 1.0 / R as f32).abs()));
        assert!(spread > 0.05, "weights all close to 1/R ({spread})");
    }

    #[test]
    fn strided_inputs_and_empty_batches_work() {
        let w = weights(1, R);
        let dir = export(&w);
        let models = load(dir.path());
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // A transposed view is not in standard layout.
        let wide = Array2::from_shape_simple_fn((D_IN, N), || uniform(&mut rng));
        let features = wide.t();
        let projected = models.project(features).unwrap();
        let want = projection_reference(features, w.proj_w.view());
        assert!(max_abs_diff(&projected, &want) <= 1e-5);

        let none = models.project(Array2::zeros((0, D_IN)).view()).unwrap();
        assert_eq!(none.dim(), (0, R, D));
        let (e, a) = models.fuse(Array3::zeros((0, R, D)).view()).unwrap();
        assert_eq!((e.dim(), a.dim()), ((0, D), (0, R)));
    }

    #[test]
    fn inputs_of_the_wrong_shape_are_rejected() {
        let dir = export(&weights(3, R));
        let models = load(dir.path());
        let err = models
            .project(Array2::zeros((N, D_IN + 1)).view())
            .unwrap_err();
        assert!(matches!(err, Error::Interface { .. }), "{err}");
        assert!(err.to_string().contains("[N, 7]"), "{err}");
        let err = models
            .fuse(Array3::zeros((N, R + 1, D)).view())
            .unwrap_err();
        assert!(err.to_string().contains("[N, 3, 4]"), "{err}");
    }

    #[test]
    fn a_graph_with_other_inputs_is_rejected_at_load() {
        let dir = export(&weights(4, R));
        // The projection graph where the fusion graph should be.
        std::fs::copy(
            dir.path().join(PROJECTION_FILE),
            dir.path().join(FUSION_FILE),
        )
        .unwrap();
        let err = ItemModels::load(&config(dir.path())).unwrap_err();
        assert!(matches!(err, Error::Interface { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(FUSION_FILE), "{message}");
        assert!(
            message.contains("inputs must be exactly `propagated`"),
            "{message}"
        );
        assert!(message.contains("features"), "{message}");

        // And the reverse.
        let dir = export(&weights(4, R));
        std::fs::copy(
            dir.path().join(FUSION_FILE),
            dir.path().join(PROJECTION_FILE),
        )
        .unwrap();
        let err = ItemModels::load(&config(dir.path())).unwrap_err();
        assert!(
            err.to_string()
                .contains("inputs must be exactly `features`"),
            "{err}"
        );
    }

    #[test]
    fn graphs_from_two_models_are_rejected_at_load() {
        let dir = export(&weights(5, R));
        let other = weights(6, R - 1);
        let fusion = item_fusion_model(
            other.w1.view(),
            other.b1.view(),
            other.w2.view(),
            other.b2.view(),
        )
        .unwrap();
        std::fs::write(dir.path().join(FUSION_FILE), fusion).unwrap();
        let err = ItemModels::load(&config(dir.path())).unwrap_err();
        assert!(matches!(err, Error::Interface { .. }), "{err}");
        assert!(err.to_string().contains("not from one model"), "{err}");
    }

    #[test]
    fn missing_files_and_bad_settings_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = ItemModels::load(&config(dir.path())).unwrap_err();
        assert!(err.to_string().contains(PROJECTION_FILE), "{err}");
        assert!(err.to_string().contains("thaw train"), "{err}");

        let bad = ItemModelsConfig {
            intra_threads: 0,
            ..ItemModelsConfig::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config(_))));
        assert!(ItemModelsConfig::default().validate().is_ok());
    }

    #[test]
    fn the_config_reads_from_json_with_defaults() {
        let cfg: ItemModelsConfig = serde_json::from_str(r#"{"model_dir": "m/v3"}"#).unwrap();
        assert_eq!(cfg.model_dir, PathBuf::from("m/v3"));
        assert_eq!(cfg.intra_threads, 1);
        assert!(serde_json::from_str::<ItemModelsConfig>(r#"{"threads": 2}"#).is_err());
    }
}
