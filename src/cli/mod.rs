//! The command line. Each subcommand parses its arguments and calls one
//! function of a stage; nothing here computes anything itself.

mod engine;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::dataset::Dataset;
use crate::eval::baselines::ModelName;
use crate::eval::report::{compare_files, Report};
use crate::eval::split::{self, Split, SplitConfig};
use crate::eval::{self, EvalConfig, Mode};

/// thaw: a streaming recommender engine for cold start.
#[derive(Debug, Parser)]
#[command(name = "thaw", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the cold-start protocol's split of a dataset (MetaKG's files).
    Split(SplitArgs),
    /// Evaluate a model on a split, or compare reports (--compare).
    Eval(EvalArgs),
    /// Train the MPKG item model on a split's meta-training data.
    Train(TrainArgs),
    /// Run the streaming engine: Kafka in, graph and inference, Redis out.
    Serve(engine::ServeArgs),
    /// Run the embedded Kafka-protocol broker (in memory), with thaw's topics.
    Broker(engine::BrokerArgs),
    /// Replay a dataset (and a cold-start split) into Kafka as the three event streams.
    Replay(engine::ReplayArgs),
    /// Broker, engine and replay in one process, then a report read back from Redis.
    Demo(engine::DemoArgs),
    /// End-to-end benchmark on a synthetic catalogue, as ratios against baselines.
    Bench(engine::BenchArgs),
}

/// Arguments of `thaw train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset folder (RecBole atomic files).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Split folder; training uses its meta-training data only.
    #[arg(long)]
    pub split: PathBuf,
    /// Output model folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Leave out pre-training tasks (ablation): kr, hnr, fr, mra.
    #[arg(long, value_delimiter = ',')]
    pub without: Vec<crate::train::mpkg::Task>,
    /// Pre-training steps.
    #[arg(long)]
    pub pretrain_steps: Option<usize>,
    /// Fine-tuning steps.
    #[arg(long)]
    pub finetune_steps: Option<usize>,
    /// Pre-training learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Most frequent KG relations turned into PKG relations.
    #[arg(long)]
    pub kg_relations: Option<usize>,
    /// Least shared users for a co-interaction edge of the PKG.
    #[arg(long)]
    pub min_co_users: Option<usize>,
    /// Co-interaction neighbours kept per item in the PKG.
    #[arg(long)]
    pub co_neighbours: Option<usize>,
    /// Weight of the fresh-item score in the blind mode and the engine
    /// (0: off), chosen on `valid/` with `thaw eval --fresh-weight`.
    #[arg(long)]
    pub fresh_weight: Option<f32>,
    /// The same in the scenario-aware mode.
    #[arg(long)]
    pub aware_fresh_weight: Option<f32>,
    /// Weight of the item-kNN score over the stream's co-occurrence counts
    /// in the blind mode and the engine (0: off), chosen on `valid/` with
    /// `thaw eval --knn-weight`.
    #[arg(long)]
    pub knn_weight: Option<f32>,
    /// The same in the scenario-aware mode.
    #[arg(long)]
    pub aware_knn_weight: Option<f32>,
    /// Weight of the fresh-item kNN score (fresh candidates from the user's
    /// fresh items) in the blind mode and the engine (0: off).
    #[arg(long)]
    pub fresh_knn_weight: Option<f32>,
    /// The same in the scenario-aware mode.
    #[arg(long)]
    pub aware_fresh_knn_weight: Option<f32>,
    /// Gradient steps of the per-user adaptation (engine and eval), chosen
    /// on `valid/` with `thaw eval --adapt-steps`.
    #[arg(long)]
    pub adapt_steps: Option<usize>,
    /// Learning rate of those steps.
    #[arg(long)]
    pub adapt_lr: Option<f32>,
    /// Skip meta-training the per-user adaptation (the engine then runs the
    /// plain steps above).
    #[arg(long)]
    pub no_meta_adapt: bool,
    /// Meta-train it with uniform task sampling instead of the adaptive task
    /// scheduler (ablation).
    #[arg(long)]
    pub no_meta_scheduler: bool,
    /// Steps of the meta-learned adaptation.
    #[arg(long)]
    pub meta_steps: Option<usize>,
    /// Outer iterations of its meta-training.
    #[arg(long)]
    pub meta_iterations: Option<usize>,
    /// Only meta-train the adaptation again, for the model already in --out
    /// (trained on this dataset and split).
    #[arg(long)]
    pub meta_only: bool,
    /// Text encoder folder (from onnx/setup.sh).
    #[arg(long, default_value = "models/text")]
    pub text_model: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 2020)]
    pub seed: u64,
}

/// Arguments of `thaw split`.
#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Dataset folder (RecBole atomic files).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of users and items that are new.
    #[arg(long, default_value_t = 0.2)]
    pub new_frac: f64,
    /// Least items a user needs in a scenario.
    #[arg(long, default_value_t = 13)]
    pub min_items: usize,
    /// Query-set size.
    #[arg(long, default_value_t = 10)]
    pub query: usize,
    /// Fraction of existing users held out as the warm scenario.
    #[arg(long, default_value_t = 0.1)]
    pub warm_frac: f64,
    /// Seed.
    #[arg(long, default_value_t = 2020)]
    pub seed: u64,
    /// Order users and items by the seeded shuffle even when the dataset has
    /// timestamps (the order of a dataset without them, e.g. Last.FM).
    #[arg(long)]
    pub no_time: bool,
}

/// What `thaw eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalTask {
    /// Ranking items for the cold-start scenarios' users.
    Recommend,
    /// MPKG's knowledge prediction on held-out PKG edges.
    Knowledge,
}

/// Arguments of `thaw eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Dataset folder (RecBole atomic files).
    #[arg(long, required_unless_present = "compare")]
    pub dataset: Option<PathBuf>,
    /// Split folder (MetaKG's format, e.g. written by `thaw split`).
    #[arg(long, required_unless_present = "compare")]
    pub split: Option<PathBuf>,
    /// Model: pop, itemknn, bpr, kgknn, contentknn, scenariopop, mpkg, metakg.
    #[arg(long, required_unless_present = "compare")]
    pub model: Option<ModelName>,
    /// A trained model's folder, for models that need one.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Where to write the JSON report (a Markdown summary is written beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cut-off K of Recall@K and NDCG@K.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// MetaKG's setting: a model may adapt to each scenario's support sets.
    #[arg(long)]
    pub scenario_aware: bool,
    /// Seed of training and of the bootstrap.
    #[arg(long, default_value_t = 2020)]
    pub seed: u64,
    /// `recommend` (the cold-start scenarios) or `knowledge` (MPKG's
    /// knowledge prediction: held-out PKG edges, warm and zero-shot heads;
    /// needs --model mpkg and --model-dir).
    #[arg(long, value_enum, default_value = "recommend")]
    pub task: EvalTask,
    /// MPKG only: a graph-neighbour weight `RELATION=W` instead of the
    /// model's own (repeatable; unnamed relations score 0), for choosing
    /// the weights on `valid/`.
    #[arg(long = "neighbour-weight", value_parser = parse_weight)]
    pub neighbour_weight: Vec<(String, f32)>,
    /// MPKG only: the fresh-item score's weight instead of the model's, for
    /// choosing it on `valid/`.
    #[arg(long)]
    pub fresh_weight: Option<f32>,
    /// MPKG only: the item-kNN score's weight instead of the model's, for
    /// choosing it on `valid/`.
    #[arg(long)]
    pub knn_weight: Option<f32>,
    /// MPKG only: the fresh-item kNN score's weight instead of the model's.
    #[arg(long)]
    pub fresh_knn_weight: Option<f32>,
    /// MPKG only: the per-user adaptation's steps instead of the model's.
    #[arg(long)]
    pub adapt_steps: Option<usize>,
    /// MPKG only: the per-user adaptation's learning rate instead of the model's.
    #[arg(long)]
    pub adapt_lr: Option<f32>,
    /// MPKG only: run the plain adaptation (mean, then `--adapt-steps` at
    /// `--adapt-lr`) even when the model has a meta-learned one.
    #[arg(long)]
    pub no_meta_adapt: bool,
    /// Compare these reports instead: one table per mode, SVG charts beside --out.
    #[arg(long, num_args = 1.., conflicts_with_all = ["dataset", "split", "model"])]
    pub compare: Vec<PathBuf>,
}

fn parse_weight(s: &str) -> Result<(String, f32), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected RELATION=WEIGHT"))?;
    let w: f32 = w
        .parse()
        .map_err(|e| format!("{s:?}: weight is not a number ({e})"))?;
    if !w.is_finite() {
        return Err(format!("{s:?}: weight must be finite"));
    }
    Ok((name.to_string(), w))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a pod's log, a file or a pipe
        // gets plain `key=value` fields.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Split(a) => run_split(a),
        Command::Eval(a) => run_eval(a),
        Command::Train(a) => run_train(a),
        Command::Serve(a) => engine::run_serve(a),
        Command::Broker(a) => engine::run_broker(a),
        Command::Replay(a) => engine::run_replay(a),
        Command::Demo(a) => engine::run_demo(a),
        Command::Bench(a) => engine::run_bench(a),
    }
}

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let ds = Dataset::load(&a.dataset)?;
    let split = Split::read(&a.split, &ds)
        .with_context(|| format!("reading split {}", a.split.display()))?;
    let mut cfg = crate::train::TrainConfig::default();
    cfg.mpkg.without = a.without;
    cfg.mpkg.seed = a.seed;
    cfg.text_model_dir = a.text_model;
    if let Some(s) = a.pretrain_steps {
        cfg.mpkg.pretrain_steps = s;
    }
    if let Some(s) = a.finetune_steps {
        cfg.mpkg.finetune_steps = s;
    }
    if let Some(lr) = a.lr {
        cfg.mpkg.lr = lr;
    }
    if let Some(k) = a.kg_relations {
        cfg.pkg.kg_relations = k;
    }
    if let Some(m) = a.min_co_users {
        cfg.pkg.min_co_users = m;
    }
    if let Some(n) = a.co_neighbours {
        cfg.pkg.neighbours = n;
    }
    if let Some(w) = a.fresh_weight {
        cfg.fresh_weight = w;
    }
    if let Some(w) = a.aware_fresh_weight {
        cfg.aware_fresh_weight = w;
    }
    if let Some(w) = a.knn_weight {
        cfg.knn_weight = w;
    }
    if let Some(w) = a.aware_knn_weight {
        cfg.aware_knn_weight = w;
    }
    if let Some(w) = a.fresh_knn_weight {
        cfg.fresh_knn_weight = w;
    }
    if let Some(w) = a.aware_fresh_knn_weight {
        cfg.aware_fresh_knn_weight = w;
    }
    if let Some(s) = a.adapt_steps {
        cfg.user_adapt.steps = s;
    }
    if let Some(lr) = a.adapt_lr {
        cfg.user_adapt.lr = lr;
    }
    cfg.meta_adapt.enabled = !a.no_meta_adapt;
    cfg.meta_adapt.scheduler = !a.no_meta_scheduler;
    if let Some(s) = a.meta_steps {
        cfg.meta_adapt.steps = s;
    }
    if let Some(n) = a.meta_iterations {
        cfg.meta_adapt.iterations = n;
    }
    if a.meta_only {
        let m = crate::train::retrain_meta_adapt(&ds, &split, &a.out, &cfg.meta_adapt)?;
        println!(
            "meta-learned adaptation written to {}: held-out (iteration, query loss, Recall@20) {:?}; the plain path {:?}",
            a.out.display(),
            m.held_out,
            m.plain
        );
        return Ok(());
    }
    let card = crate::train::train(&ds, &split, &cfg, &a.out)?;
    println!("{}", serde_json::to_string_pretty(&card.training)?);
    println!("model {} written to {}", card.version, a.out.display());
    Ok(())
}

fn run_split(a: SplitArgs) -> anyhow::Result<()> {
    let ds = Dataset::load(&a.dataset)?;
    let cfg = SplitConfig {
        new_frac: a.new_frac,
        warm_frac: a.warm_frac,
        min_items: a.min_items,
        query: a.query,
        seed: a.seed,
        no_time: a.no_time,
    };
    let (mut s, stats) = split::build(&ds, &cfg, true)?;
    s.write(&a.out, &ds)?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    println!("split {} written to {}", s.digest, a.out.display());
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    if !a.compare.is_empty() {
        let out = a.out.unwrap_or_else(|| PathBuf::from("compare.md"));
        let (cmp, charts) = compare_files(&a.compare, &out)?;
        println!("{}", cmp.markdown);
        println!("table: {}", out.display());
        for c in charts {
            println!("chart: {}", c.display());
        }
        return Ok(());
    }
    let (Some(dataset), Some(split_dir), Some(model)) = (a.dataset, a.split, a.model) else {
        bail!("--dataset, --split and --model are required unless --compare is given");
    };
    if a.k == 0 {
        bail!("--k must be at least 1");
    }
    let ds = Dataset::load(&dataset)?;
    let split = Split::read(&split_dir, &ds)
        .with_context(|| format!("reading split {}", split_dir.display()))?;
    if a.task == EvalTask::Knowledge {
        if model != ModelName::Mpkg {
            bail!("--task knowledge ranks with a trained item model: use --model mpkg");
        }
        let Some(dir) = &a.model_dir else {
            bail!("--task knowledge needs --model-dir (a folder written by `thaw train`)");
        };
        let report = crate::eval::knowledge::run(
            &ds,
            &split,
            dir,
            &crate::eval::knowledge::KnowledgeConfig {
                k: a.k,
                seed: a.seed,
                ..Default::default()
            },
        )?;
        println!("{}", report.markdown());
        if let Some(out) = a.out {
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("report: {}", out.display());
        }
        return Ok(());
    }
    // --adapt-steps / --adapt-lr / --no-meta-adapt: the model's own
    // adaptation with those changed.
    let user_adapt = match (a.adapt_steps, a.adapt_lr, a.no_meta_adapt) {
        (None, None, false) => None,
        _ if model != ModelName::Mpkg => {
            bail!("--adapt-steps, --adapt-lr and --no-meta-adapt apply to --model mpkg only")
        }
        (steps, lr, no_meta) => {
            let dir = a
                .model_dir
                .as_deref()
                .context("--adapt-steps, --adapt-lr and --no-meta-adapt need --model-dir")?;
            let card = crate::train::TrainedModel::load(dir)?.card;
            let mut c = card.user_adapt.clone();
            c.steps = steps.unwrap_or(c.steps);
            c.lr = lr.unwrap_or(c.lr);
            c.meta_learned = c.meta_learned && !no_meta;
            Some(c.with_meta(card.meta_adapt.as_ref()))
        }
    };
    let cfg = EvalConfig {
        model,
        mode: if a.scenario_aware {
            Mode::Aware
        } else {
            Mode::Blind
        },
        k: a.k,
        seed: a.seed,
        model_dir: a.model_dir,
        neighbour_weights: if a.neighbour_weight.is_empty() {
            None
        } else {
            if model != ModelName::Mpkg {
                bail!("--neighbour-weight applies to --model mpkg only");
            }
            Some(a.neighbour_weight.into_iter().collect())
        },
        fresh_weight: match a.fresh_weight {
            Some(_) if model != ModelName::Mpkg => {
                bail!("--fresh-weight applies to --model mpkg only")
            }
            w => w,
        },
        knn_weight: match a.knn_weight {
            Some(_) if model != ModelName::Mpkg => {
                bail!("--knn-weight applies to --model mpkg only")
            }
            w => w,
        },
        fresh_knn_weight: match a.fresh_knn_weight {
            Some(_) if model != ModelName::Mpkg => {
                bail!("--fresh-knn-weight applies to --model mpkg only")
            }
            w => w,
        },
        user_adapt,
    };
    let report: Report = eval::run(&ds, &split, &cfg)?;
    println!("{}", report.markdown());
    if let Some(out) = a.out {
        report.write(&out)?;
        println!("report: {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_weights_parse_or_say_why() {
        assert_eq!(
            parse_weight("co_interacted=256").unwrap(),
            ("co_interacted".to_string(), 256.0)
        );
        assert!(parse_weight("co_interacted")
            .unwrap_err()
            .contains("RELATION=WEIGHT"));
        assert!(parse_weight("co_liked=lots")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_weight("co_liked=inf").unwrap_err().contains("finite"));
    }

    #[test]
    fn neighbour_weights_reach_the_eval_config() {
        let cli = Cli::try_parse_from([
            "thaw",
            "eval",
            "--dataset",
            "d",
            "--split",
            "s",
            "--model",
            "mpkg",
            "--neighbour-weight",
            "co_interacted=16",
            "--neighbour-weight",
            "co_liked=0.5",
        ])
        .unwrap();
        let Command::Eval(a) = cli.command else {
            panic!("not eval");
        };
        assert_eq!(
            a.neighbour_weight,
            vec![("co_interacted".into(), 16.0), ("co_liked".into(), 0.5)]
        );
    }
}
