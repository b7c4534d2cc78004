//! ONNX Runtime inference: the sessions that turn items into vectors.
//!
//! - [`text`]: the all-MiniLM-L6-v2 sentence encoder (`tokenizers` + `ort`), which
//!   embeds an item's `title + description`; its graph is built by
//!   `onnx/build_text_encoder.py` (run by `onnx/setup.sh`).
//!
//! ONNX Runtime is loaded at run time from a shared library (the `ort` crate's
//! `load-dynamic` mode): the one shipped in the pinned `onnxruntime` Python wheel,
//! so Python and Rust run the very same build. [`init_ort`] loads it once per
//! process; every session shares that one environment.

pub mod item;
pub mod stage;
pub mod text;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;

/// Environment variable naming the ONNX Runtime shared library
/// (`libonnxruntime.so.1.31.1`); `onnx/setup.sh` prints its path.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The file, inside a model folder, in which `onnx/setup.sh` records the path
/// of the ONNX Runtime shared library.
pub const ORT_DYLIB_FILE: &str = "ort_dylib_path";

/// Errors of the inference layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No ONNX Runtime library was named, neither by argument nor by environment.
    #[error(
        "no ONNX Runtime library given: set {ORT_DYLIB_ENV} to libonnxruntime.so.1.31.1 \
         (run onnx/setup.sh, it prints the path)"
    )]
    OrtLibraryUnset,
    /// The named ONNX Runtime library does not exist.
    #[error("ONNX Runtime library {path} does not exist (run onnx/setup.sh)")]
    OrtLibraryMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The ONNX Runtime library exists but could not be loaded.
    #[error("could not load ONNX Runtime from {path}: {source}")]
    OrtLibraryLoad {
        /// The library's path.
        path: PathBuf,
        /// Why loading failed (not a shared library, wrong version, ...).
        #[source]
        source: ort::LoadDynamicError,
    },
    /// An error reported by ONNX Runtime (session creation, a run, a tensor).
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    /// A model file the encoder needs is not there.
    #[error("{path} is missing: run onnx/setup.sh to build the text model")]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer could not be loaded or configured.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// Tokenising input text failed.
    #[error("tokenizing: {0}")]
    Tokenize(String),
    /// The ONNX graph's inputs or outputs are not the ones this code feeds and reads.
    #[error("{path} does not have the expected interface: {detail}")]
    Interface {
        /// The model file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// ONNX Runtime returned an output of an unexpected shape.
    #[error("unexpected model output: {0}")]
    Output(String),
}

/// Result of the inference layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The one ONNX Runtime environment of this process (`ort` allows only one).
static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
/// Serialises the first initialisation, so two threads never both load the library.
static INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime and creates the process-wide environment; idempotent.
///
/// The library is `dylib` if given, else the file named by `ORT_DYLIB_PATH`.
/// Only the first successful call loads anything: later calls return `Ok(())`
/// whatever path they name, because a process cannot swap ONNX Runtime builds.
pub fn init_ort(dylib: Option<&Path>) -> Result<()> {
    environment(dylib).map(|_| ())
}

/// The process-wide environment, created by the first call (see [`init_ort`]).
pub(crate) fn environment(dylib: Option<&Path>) -> Result<&'static Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    // A std Mutex is fine: held only for the one-off load, never across an await.
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = resolve_dylib(dylib, std::env::var_os(ORT_DYLIB_ENV))?;
    let builder = ort::init_from(&path).map_err(|source| Error::OrtLibraryLoad {
        path: path.clone(),
        source,
    })?;
    let env = builder.with_name("thaw").build()?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// The environment for the sessions of a model in `model_dir`. The library is
/// `explicit` if given, else `ORT_DYLIB_PATH` if set, else the path recorded in
/// `model_dir/ort_dylib_path`, else whatever this process already loaded.
pub(crate) fn environment_for(
    explicit: Option<&Path>,
    model_dir: &Path,
) -> Result<&'static Environment> {
    let dylib = match explicit {
        Some(path) => Some(path.to_path_buf()),
        None if std::env::var_os(ORT_DYLIB_ENV).is_some_and(|v| !v.is_empty()) => None,
        None => recorded_dylib(model_dir)?,
    };
    environment(dylib.as_deref())
}

/// The library path recorded in `model_dir/ort_dylib_path`, if that file exists
/// and is not empty.
pub(crate) fn recorded_dylib(model_dir: &Path) -> Result<Option<PathBuf>> {
    let path = model_dir.join(ORT_DYLIB_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(PathBuf::from(text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// The library to load: `dylib` if given, else the environment variable's value;
/// it must be an existing file.
fn resolve_dylib(dylib: Option<&Path>, env_value: Option<OsString>) -> Result<PathBuf> {
    let path = match dylib {
        Some(path) => path.to_path_buf(),
        None => env_value
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .ok_or(Error::OrtLibraryUnset)?,
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::OrtLibraryMissing { path })
    }
}

/// A session builder with this crate's threading and optimisation settings.
fn builder(
    env: &Environment,
    intra_threads: usize,
) -> Result<ort::session::builder::SessionBuilder> {
    Ok(ort::session::Session::builder(env)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(ort::Error::from)?
        .with_intra_threads(intra_threads)
        .map_err(ort::Error::from)?
        .with_inter_threads(1)
        .map_err(ort::Error::from)?)
}

/// The one session builder of every model (text encoder, item projection,
/// fusion): the session of `path` on CUDA if `try_cuda`, the crate feature
/// `cuda` is on and the provider registers, else on CPU; returned with the
/// provider's name ([`item::CPU_PROVIDER`] or [`item::CUDA_PROVIDER`]).
pub(crate) fn session(
    env: &Environment,
    path: &Path,
    intra_threads: usize,
    try_cuda: bool,
) -> Result<(ort::session::Session, &'static str)> {
    #[cfg(feature = "cuda")]
    if try_cuda {
        let cuda = builder(env, intra_threads).and_then(|b| {
            let mut b = b
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(ort::Error::from)?;
            Ok(b.commit_from_file(path)?)
        });
        match cuda {
            Ok(session) => return Ok((session, item::CUDA_PROVIDER)),
            Err(e) => tracing::warn!(
                model = %path.display(),
                error = %e,
                "CUDA execution provider unavailable, running on CPU"
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = try_cuda;
    let session = builder(env, intra_threads)?.commit_from_file(path)?;
    Ok((session, item::CPU_PROVIDER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_path_comes_from_the_argument_then_the_environment() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let named = resolve_dylib(Some(file.path()), Some("/elsewhere".into())).unwrap();
        assert_eq!(named, file.path());
        let from_env = resolve_dylib(None, Some(file.path().as_os_str().to_owned())).unwrap();
        assert_eq!(from_env, file.path());
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let err = resolve_dylib(None, None).unwrap_err();
        assert!(matches!(err, Error::OrtLibraryUnset), "{err}");
        assert!(err.to_string().contains("onnx/setup.sh"), "{err}");
        let err = resolve_dylib(None, Some("".into())).unwrap_err();
        assert!(matches!(err, Error::OrtLibraryUnset), "{err}");
        let err =
            resolve_dylib(Some(Path::new("/nonexistent/libonnxruntime.so")), None).unwrap_err();
        assert!(matches!(err, Error::OrtLibraryMissing { .. }), "{err}");
        assert!(err.to_string().contains("onnx/setup.sh"), "{err}");
    }
}
