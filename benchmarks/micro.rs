//! Criterion micro-benchmarks of thaw's hot paths (`make bench-micro`, or
//! `cargo bench --bench micro`). Throughput is reported in elements (events,
//! edges, items, users). Each comparison (incremental vs full propagation,
//! ONNX Runtime vs ndarray) is measured in the same run, and the ratio is
//! printed at the end of its group.
//!
//! The graph is the `medium` synthetic catalogue of `thaw bench` (100K
//! items, ~2.8M edges, seeded), so these figures sit beside the end-to-end
//! ones; propagation runs exact and at the engine's default tolerance.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2, Array3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use thaw::adapt::{adapt_user, key, rank_users, top_k, AdaptConfig, Catalogue};
use thaw::graph::{Pkg, Propagator, PropagatorConfig};
use thaw::infer::item::{ItemModels, ItemModelsConfig};
use thaw::ingest::events::{decode, Limits, Topic};
use thaw::tools::bench::{generate, Synth};
use thaw::train::export;

const D: usize = 64;
const SEED: u64 = 7;

fn random(rng: &mut ChaCha8Rng, shape: (usize, usize)) -> Array2<f32> {
    Array2::from_shape_fn(shape, |_| rng.random_range(-0.5f32..0.5))
}

/// Median of a few timed runs of `f`, seconds.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn decoding(c: &mut Criterion) {
    let limits = Limits::default();
    let items: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"item_id":"sku-{i}","title":"Blue cotton shirt with a pocket, size {i}","categories":["shirts","cotton"],"ts":1700000000{:03}}}"#,
                i % 1000
            )
            .into_bytes()
        })
        .collect();
    let edges: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"src":"sku-{i}","dst":"sku-{}","relation":"also_bought","op":"add","ts":1700000000000}}"#,
                i + 1
            )
            .into_bytes()
        })
        .collect();
    let clicks: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"user_id":"u-{}","item_id":"sku-{i}","kind":"click","ts":1700000000000}}"#,
                i % 97
            )
            .into_bytes()
        })
        .collect();
    let mut g = c.benchmark_group("decode");
    for (name, topic, msgs) in [
        ("item", Topic::Items, &items),
        ("relation", Topic::ItemRelations, &edges),
        ("interaction", Topic::Interactions, &clicks),
    ] {
        for m in msgs.iter() {
            decode(topic, None, m, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        g.throughput(Throughput::Elements(msgs.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                for m in msgs.iter() {
                    black_box(decode(topic, None, black_box(m), &limits).is_ok());
                }
            })
        });
    }
    g.finish();
}

/// The `medium` catalogue (100K items, ~2.8M edges, seeded), its graph and
/// random inputs.
fn graph() -> (Synth, Pkg, Vec<Array2<f32>>) {
    let synth = generate(100_000, SEED);
    let pkg = synth.pkg().expect("synthetic graph");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let inputs: Vec<Array2<f32>> = (0..pkg.num_relations())
        .map(|_| random(&mut rng, (pkg.slots(), D)))
        .collect();
    (synth, pkg, inputs)
}

/// Seconds to apply `n` new edges (drawn as the catalogue's are, by
/// popularity) to `pkg` and `prop`, which keep them: every call adds more.
fn add_edges(
    synth: &Synth,
    pkg: &mut Pkg,
    prop: &mut Propagator,
    rng: &mut ChaCha8Rng,
    n: usize,
) -> Duration {
    for _ in 0..n {
        let (a, b) = synth.new_edge(pkg, 0, rng);
        pkg.add_edge(0, a, b).unwrap();
    }
    let batch = pkg.take_changes();
    let t0 = std::time::Instant::now();
    black_box(prop.apply(pkg, &batch).unwrap());
    t0.elapsed()
}

fn propagation(c: &mut Criterion) {
    let (synth, pkg, inputs) = graph();
    let views: Vec<_> = inputs.iter().map(|x| x.view()).collect();
    let mut g = c.benchmark_group("propagation_medium");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let full_cfg = PropagatorConfig::default();
    g.throughput(Throughput::Elements(1));
    g.bench_function("full", |b| {
        b.iter(|| black_box(Propagator::full(full_cfg.clone(), &pkg, &views).unwrap()))
    });
    let full = median_secs(5, || {
        black_box(Propagator::full(full_cfg.clone(), &pkg, &views).unwrap());
    });
    let mut ratios = Vec::new();
    let engine = thaw::serve::config::GraphSettings::default().tolerance;
    for tolerance in [0.0f32, engine] {
        let cfg = PropagatorConfig {
            tolerance,
            ..Default::default()
        };
        // One evolving graph per setting: each iteration adds new edges.
        let mut p = pkg.clone();
        let mut prop = Propagator::full(cfg, &p, &views).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0xe);
        for n in [1usize, 1000] {
            let name = format!("{n}_edge{}_tol{tolerance:e}", if n > 1 { "s" } else { "" });
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| add_edges(&synth, &mut p, &mut prop, &mut rng, n))
                        .sum()
                })
            });
            let mut secs: Vec<f64> = (0..5)
                .map(|_| add_edges(&synth, &mut p, &mut prop, &mut rng, n).as_secs_f64())
                .collect();
            secs.sort_by(f64::total_cmp);
            ratios.push((name, full / (secs[2] / n as f64)));
        }
    }
    g.finish();
    println!("\nfull propagation (median of 5): {:.1} ms", full * 1e3);
    for (name, r) in ratios {
        println!("incremental vs full, per edge, {name}: {r:.0}x");
    }
}

/// The ONNX Runtime library, as `thaw` finds it: `ORT_DYLIB_PATH`, else the
/// path `onnx/setup.sh` recorded.
fn ort_dylib() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    let recorded = std::fs::read_to_string("models/text/ort_dylib_path").ok()?;
    Some(PathBuf::from(recorded.trim()))
}

fn fusion(c: &mut Criterion) {
    let Some(dylib) = ort_dylib() else {
        eprintln!("fusion: skipped, no ONNX Runtime (run `make models` or set ORT_DYLIB_PATH)");
        return;
    };
    let (r, h, n, d_in) = (3usize, 32usize, 1024usize, 16usize);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let w1 = Array3::from_shape_fn((r, D, h), |_| rng.random_range(-0.2f32..0.2));
    let b1 = random(&mut rng, (r, h));
    let w2 = random(&mut rng, (r, h));
    let b2 = Array1::from_shape_fn(r, |_| rng.random_range(-0.2f32..0.2));
    let proj = Array3::from_shape_fn((r, d_in, D), |_| rng.random_range(-0.2f32..0.2));
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join(export::PROJECTION_FILE),
        export::item_projection_model(proj.view()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(export::FUSION_FILE),
        export::item_fusion_model(w1.view(), b1.view(), w2.view(), b2.view()).unwrap(),
    )
    .unwrap();
    let models = ItemModels::load(&ItemModelsConfig {
        model_dir: dir.path().to_path_buf(),
        intra_threads: 1,
        ort_dylib: Some(dylib),
    })
    .expect("loading the fusion graph");
    let x = Array3::from_shape_fn((n, r, D), |_| rng.random_range(-1.0f32..1.0));
    let (a, _) = models.fuse(x.view()).unwrap();
    let (b, _) = export::fusion_reference(x.view(), w1.view(), b1.view(), w2.view(), b2.view());
    let worst = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst < 1e-4, "ONNX and ndarray fusion disagree by {worst}");

    let mut g = c.benchmark_group("item_fusion");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("onnxruntime", |bch| {
        bch.iter(|| black_box(models.fuse(x.view()).unwrap()))
    });
    // The same arithmetic written directly with ndarray.
    let direct = || export::fusion_reference(x.view(), w1.view(), b1.view(), w2.view(), b2.view());
    g.bench_function("ndarray", |bch| bch.iter(|| black_box(direct())));
    g.finish();
    let ort = median_secs(51, || {
        black_box(models.fuse(x.view()).unwrap());
    });
    let nd = median_secs(51, || {
        black_box(direct());
    });
    println!(
        "\nitem_fusion of {n} items: onnxruntime {:.0} us, ndarray {:.0} us, overhead ratio {:.2}",
        ort * 1e6,
        nd * 1e6,
        ort / nd
    );
}

fn users(c: &mut Criterion) {
    let n = 100_000usize;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let emb = random(&mut rng, (n, D));
    let bias = Array1::from_shape_fn(n, |_| rng.random_range(-0.1f32..0.1));
    let active = vec![true; n];
    let keys: Vec<u64> = (0..n).map(|i| key(&format!("p{i}"))).collect();
    // The engine's ranking adds the graph-neighbour score over the PKG: the
    // medium catalogue's graph, every relation weighted.
    let pkg = generate(100_000, SEED).pkg().expect("synthetic graph");
    assert_eq!(pkg.slots(), n);
    let weights = vec![1.0f32; pkg.num_relations()];
    let cat = Catalogue {
        emb: emb.view(),
        bias: bias.view(),
        active: &active,
        keys: &keys,
        graph: Some((&pkg, &weights)),
        fresh: None,
        knn: None,
        pool: None,
    };
    let histories: Vec<Vec<u32>> = (0..64)
        .map(|_| (0..5).map(|_| rng.random_range(0..n as u32)).collect())
        .collect();
    let mut g = c.benchmark_group("users_100k_items");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    for steps in [0usize, 3] {
        let cfg = AdaptConfig {
            steps,
            ..Default::default()
        };
        let mut k = 0;
        g.bench_function(format!("adapt_{steps}_steps"), |b| {
            b.iter(|| {
                k = (k + 1) % histories.len();
                black_box(adapt_user(&cat, &histories[k], k as u64, &cfg))
            })
        });
    }
    // The meta-learned adaptation at its default 5 steps (per-dimension
    // learning rates: the same work as 5 plain steps plus a d-vector product),
    // alone and with the user's top 100 over the 100K items, the engine's
    // work per user.
    let meta = std::sync::Arc::new(thaw::adapt::MetaAdapt::plain(D, 5, 0.5, 0.1));
    let cfg = AdaptConfig::default().with_meta(Some(&meta));
    let mut k = 0;
    g.bench_function("adapt_meta_5_steps", |b| {
        b.iter(|| {
            k = (k + 1) % histories.len();
            black_box(adapt_user(&cat, &histories[k], k as u64, &cfg))
        })
    });
    g.bench_function("adapt_meta_5_steps_and_top_100", |b| {
        b.iter(|| {
            k = (k + 1) % histories.len();
            let u = adapt_user(&cat, &histories[k], k as u64, &cfg).expect("items");
            black_box(top_k(&cat, u.view(), &histories[k], 100))
        })
    });
    // The negatives drawn from the engine's pool (4,096 items picked once per
    // batch) rather than by a pass over the catalogue per user.
    let pool = thaw::adapt::negative_pool(&cat, 4096);
    let pooled = Catalogue {
        pool: Some(&pool),
        ..cat
    };
    g.bench_function("adapt_meta_5_steps_pooled", |b| {
        b.iter(|| {
            k = (k + 1) % histories.len();
            black_box(adapt_user(&pooled, &histories[k], k as u64, &cfg))
        })
    });
    // The engine's work for a batch of 64 users, per user: the pool, each
    // user's 5 meta-learned steps, their top 100 over the 100K items in one
    // block (one matrix product).
    g.throughput(Throughput::Elements(histories.len() as u64));
    g.bench_function("engine_64_users_meta_5_steps_and_top_100", |b| {
        b.iter(|| {
            let pool = thaw::adapt::negative_pool(&cat, 4096);
            let pooled = Catalogue {
                pool: Some(&pool),
                ..cat
            };
            let vs: Vec<Array1<f32>> = histories
                .iter()
                .enumerate()
                .map(|(k, h)| adapt_user(&pooled, h, k as u64, &cfg).expect("items"))
                .collect();
            let q: Vec<(ndarray::ArrayView1<'_, f32>, &[u32])> = vs
                .iter()
                .zip(&histories)
                .map(|(v, h)| (v.view(), h.as_slice()))
                .collect();
            black_box(rank_users(&pooled, &q, 100))
        })
    });
    g.throughput(Throughput::Elements(1));
    let u = Array1::from_shape_fn(D, |_| rng.random_range(-1.0f32..1.0));
    g.bench_function("top_100_one_user", |b| {
        b.iter(|| black_box(top_k(&cat, u.view(), &histories[0], 100)))
    });
    // The same without the graph-neighbour term, for its cost in this run.
    let plain = Catalogue { graph: None, ..cat };
    g.bench_function("top_100_one_user_without_graph_term", |b| {
        b.iter(|| black_box(top_k(&plain, u.view(), &histories[0], 100)))
    });
    let vs: Vec<Array1<f32>> = (0..64).map(|i| emb.row(i).to_owned()).collect();
    let block: Vec<(ndarray::ArrayView1<'_, f32>, &[u32])> = vs
        .iter()
        .zip(&histories)
        .map(|(v, h)| (v.view(), h.as_slice()))
        .collect();
    g.throughput(Throughput::Elements(block.len() as u64));
    g.bench_function("top_100_block_of_64_users", |b| {
        b.iter(|| black_box(rank_users(&cat, &block, 100)))
    });
    g.finish();
}

/// The engine's behavioural relations (`graph::co`): one interaction's cost
/// (co-counts with the user's window, the item's list re-selected, the window
/// items reconsidering it) once 10K users have made 200K interactions over
/// 100K items drawn with a Zipf-like skew, at the default settings (window
/// 200, 10 neighbours, 2 shared users).
fn co_graph(c: &mut Criterion) {
    use thaw::graph::co::CoGraph;
    use thaw::train::pkg_build::PkgConfig;
    let (n_items, n_users) = (100_000u32, 10_000u32);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    // Item i drawn with weight ~ 1 / (i + 10): a popular head, a long tail.
    let draw = |rng: &mut ChaCha8Rng| -> u32 {
        let u: f64 = rng.random_range(0.0..1.0);
        let (lo, hi) = (10f64.ln(), (n_items as f64 + 10.0).ln());
        ((lo + u * (hi - lo)).exp() - 10.0).clamp(0.0, n_items as f64 - 1.0) as u32
    };
    let mut g = CoGraph::new(PkgConfig::default().co());
    for i in 0..n_items {
        g.set_key(i, key(&format!("item-{i}")));
    }
    let mut hist: Vec<Vec<u32>> = vec![Vec::new(); n_users as usize];
    let mut step = |g: &mut CoGraph, rng: &mut ChaCha8Rng| {
        let u = rng.random_range(0..n_users) as usize;
        let i = draw(rng);
        if !hist[u].contains(&i) {
            black_box(g.interact(&hist[u], i));
            hist[u].push(i);
        }
    };
    for _ in 0..200_000 {
        step(&mut g, &mut rng);
    }
    let mut group = c.benchmark_group("co_graph");
    group.throughput(Throughput::Elements(1));
    group.bench_function("interaction_after_200k", |b| {
        b.iter(|| step(&mut g, &mut rng))
    });
    group.finish();
}

criterion_group!(benches, decoding, propagation, fusion, users, co_graph);
criterion_main!(benches);
