//! `thaw serve`, `thaw broker` and `thaw demo`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::kafka::EmbeddedBroker;
use crate::serve::config::Settings;

/// Arguments of `thaw serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Settings file (TOML); compiled-in defaults otherwise. `THAW__SECTION__KEY`
    /// environment variables override both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shorthand for `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
}

/// Arguments of `thaw broker`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Bootstrap address clients connect to.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Also write the bootstrap address to this file.
    #[arg(long)]
    pub bootstrap_file: Option<PathBuf>,
}

/// Arguments of `thaw replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Dataset folder (RecBole atomic files).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Events per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Cold-start split: meta-training first, then the scenario users' support sets.
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Model folder whose PKG settings (relations) the replayed edges follow.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// librdkafka property KEY=VALUE (repeatable), e.g. security.protocol=SASL_SSL.
    #[arg(long = "property", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// Write the events as JSON lines to this file instead of producing them.
    #[arg(long)]
    pub dry_run: Option<PathBuf>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Arguments of `thaw demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Dataset folder.
    #[arg(long, default_value = "data/ml-100k")]
    pub dataset: PathBuf,
    /// Cold-start split folder (default: the reference split beside the
    /// checkout if present, else splits/ml100k).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Settings file for the engine (model folders, Redis, ...).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Rate of the live phase (the scenario users' support interactions),
    /// events per second; the history before it goes as fast as possible.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// K of the scored lists.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `thaw serve`.
pub fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(a.config.as_deref())?;
    if let Some(b) = a.brokers {
        crate::kafka::check_brokers(&b)?;
        settings.kafka.brokers = b;
    }
    runtime()?.block_on(async move {
        let engine = crate::serve::Engine::start(settings).await?;
        let stop = engine.stopper();
        tokio::spawn(async move {
            terminated().await;
            tracing::info!("stopping: draining, publishing, committing");
            stop();
        });
        engine.wait().await
    })
}

/// `thaw broker`.
pub fn run_broker(a: BrokerArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let broker = EmbeddedBroker::start(Some(a.listen)).await?;
        if let Some(f) = &a.bootstrap_file {
            crate::kafka::write_bootstrap_file(f, broker.bootstrap_servers())?;
        }
        println!("{}", broker.bootstrap_servers());
        eprintln!(
            "embedded Kafka broker (librdkafka mock cluster, in memory) at {} (broker {}); topics: {}; Ctrl-C or SIGTERM stops it",
            broker.bootstrap_servers(),
            broker.broker_addresses(),
            crate::kafka::topics()
                .iter()
                .map(|t| format!("{} ({} partitions)", t.name, t.partitions))
                .collect::<Vec<_>>()
                .join(", ")
        );
        terminated().await;
        drop(broker);
        Ok(())
    })
}

/// `thaw replay`.
pub fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    crate::kafka::check_brokers(&a.brokers)?;
    let ds = crate::dataset::Dataset::load(&a.dataset)?;
    let split = match &a.split {
        Some(p) => Some(
            crate::eval::split::Split::read(p, &ds)
                .with_context(|| format!("reading split {}", p.display()))?,
        ),
        None => None,
    };
    let pkg_cfg = match &a.model_dir {
        Some(d) => {
            let p = d.join("model.json");
            let card: crate::train::ModelCard = serde_json::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?;
            card.config.pkg
        }
        None => crate::train::pkg_build::PkgConfig::default(),
    };
    let events = crate::tools::replay::dataset_events(&ds, split.as_ref(), &pkg_cfg)?;
    if let Some(path) = &a.dry_run {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for e in &events {
            let value: serde_json::Value = serde_json::from_slice(&e.encode()?)?;
            serde_json::to_writer(
                &mut f,
                &serde_json::json!({"topic": e.topic().name(), "key": e.key(), "value": value}),
            )?;
            writeln!(f)?;
        }
        println!("{} events written to {}", events.len(), path.display());
        return Ok(());
    }
    let mut kafka = crate::kafka::KafkaSettings::with_brokers(a.brokers);
    kafka.properties.extend(a.properties);
    let stats = runtime()?.block_on(crate::tools::replay::produce(&events, &kafka, a.rate))?;
    println!(
        "{} events ({} items, {} relations, {} interactions) in {:.1} s: {:.0} events/s",
        stats.events,
        stats.items,
        stats.relations,
        stats.interactions,
        stats.seconds,
        stats.events as f64 / stats.seconds.max(1e-9)
    );
    Ok(())
}

/// `thaw demo`.
pub fn run_demo(a: DemoArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(a.config.as_deref())?;
    if let Ok(url) = std::env::var("REDIS_URL") {
        settings.redis.url = url;
    }
    if a.config.is_none() {
        settings.http.listen = "127.0.0.1:0".into();
    }
    let split = a.split.unwrap_or_else(|| {
        let reference = PathBuf::from("../shared/eval/ml100k-coldstart");
        if reference.join("meta_training.txt").is_file() {
            reference
        } else {
            PathBuf::from("splits/ml100k")
        }
    });
    let report = runtime()?.block_on(crate::tools::demo::run(crate::tools::demo::DemoArgs {
        dataset: a.dataset,
        split,
        settings,
        rate: (a.rate > 0.0).then_some(a.rate),
        k: a.k,
        out: a.out,
    }))?;
    println!("{}", crate::tools::demo::render(&report));
    Ok(())
}

/// Arguments of `thaw bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Catalogue size: small (10K items), medium (100K), large (1M; graph only).
    #[arg(long, value_enum, default_value = "medium")]
    pub size: crate::tools::bench::Size,
    /// Offered rate of the freshness phase, events per second.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Text encoder folder.
    #[arg(long, default_value = "models/text")]
    pub text_dir: PathBuf,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Further freshness phases at these rates (events per second), after
    /// the one at `--rate`.
    #[arg(long, value_delimiter = ',')]
    pub more_rates: Vec<f64>,
    /// Length of the freshness phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Share of new items (with a title and two edges) among the freshness
    /// phase's events; the rest are new edges.
    #[arg(long, default_value_t = 0.02)]
    pub item_share: f64,
    /// Only the graph figures (no Kafka, no Redis).
    #[arg(long)]
    pub graph_only: bool,
    /// Propagation tolerance (`graph.tolerance`) of the tolerant figures and
    /// the engine; default: the engine's.
    #[arg(long)]
    pub tolerance: Option<f32>,
    /// Zipf exponent of an edge target's popularity.
    #[arg(long, default_value_t = crate::tools::bench::LINK_EXPONENT)]
    pub link_exponent: f64,
    /// Draw edge sources by popularity too (else uniformly).
    #[arg(long)]
    pub link_both_ends: bool,
    /// After the run, restart the engine twice on the same log and group:
    /// from the snapshot its shutdown wrote, and from the log alone; report
    /// both restart times.
    #[arg(long)]
    pub restart: bool,
    /// Instead of the run above: N replicas (`kafka.replica_id`) against
    /// one instance on the same stream, each on a broker of its own; the
    /// time from the first interaction to every replica idle, as a ratio.
    #[arg(long)]
    pub replicas: Option<usize>,
}

/// `thaw bench`.
pub fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    if !(a.rate > 0.0
        && a.more_rates.iter().all(|r| *r > 0.0)
        && a.seconds > 0.0
        && (0.0..=0.5).contains(&a.item_share))
    {
        anyhow::bail!("--rate and --seconds must be positive and --item-share within 0..=0.5");
    }
    if !(a.link_exponent >= 0.0 && a.link_exponent.is_finite()) {
        anyhow::bail!("--link-exponent must be a finite number >= 0");
    }
    let o = crate::tools::bench::BenchOptions {
        redis_url: url,
        text_dir: a.text_dir.clone(),
        rate: a.rate,
        more_rates: a.more_rates.clone(),
        seconds: a.seconds,
        item_share: a.item_share,
        graph_only: a.graph_only,
        restart: a.restart,
        tolerance: a
            .tolerance
            .unwrap_or(crate::serve::config::GraphSettings::default().tolerance),
        links: crate::tools::bench::LinkModel {
            exponent: a.link_exponent,
            both_ends: a.link_both_ends,
        },
        ..crate::tools::bench::BenchOptions::new(a.size)
    };
    let json = match a.replicas {
        Some(n) if n >= 2 => serde_json::to_string_pretty(
            &runtime()?.block_on(crate::tools::bench::replicas(&o, n))?,
        )?,
        Some(_) => anyhow::bail!("--replicas must be at least 2 (it is compared with one)"),
        None => serde_json::to_string_pretty(&runtime()?.block_on(crate::tools::bench::run(&o))?)?,
    };
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{json}");
    Ok(())
}
