//! Settings of `thaw serve`: compiled-in defaults, then a TOML file, then
//! environment variables `THAW__SECTION__KEY` (e.g. `THAW__KAFKA__BROKERS`,
//! `THAW__REDIS__URL`, `THAW__KAFKA__PROPERTIES__SECURITY.PROTOCOL`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::adapt::AdaptConfig;
use crate::ingest::Limits;
use crate::kafka::KafkaSettings;

/// Everything `thaw serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Kafka cluster, consumer group, librdkafka pass-through.
    pub kafka: KafkaSettings,
    /// Where and how to publish.
    pub redis: RedisSettings,
    /// The model folders.
    pub model: ModelSettings,
    /// Batching and validation of the input streams.
    pub ingest: IngestSettings,
    /// Per-user adaptation and recommendation lists.
    pub users: UserSettings,
    /// The metrics and health endpoints.
    pub http: HttpSettings,
    /// Incremental propagation over the product graph.
    pub graph: GraphSettings,
    /// Checkpoints of the engine state, so that a restart reads only the
    /// log after the latest one.
    pub snapshot: SnapshotSettings,
    /// The engine's memory: a budget for its resident set.
    pub memory: MemorySettings,
}

/// The engine's resident memory ([`crate::serve::memory`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemorySettings {
    /// Budget for the process's resident set, MiB; 0 (the default): none.
    /// The state is bounded by `users.max_users` and
    /// `graph.max_placeholders` (a start whose bounds cannot fit the budget
    /// says so); the budget bounds what is in flight: messages read and not
    /// yet published take at most the room left below 80% of it (8 KB
    /// each), and above 80% ingest takes smaller batches and waits for each to be published
    /// before reading on, so a burst waits in Kafka rather than in memory,
    /// and freed memory is handed back to the operating system. Set it to
    /// about 80% of the container's memory limit.
    pub budget_mb: u64,
    /// How often the resident set is read, ms. Default 250.
    pub check_ms: u64,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            budget_mb: 0,
            check_ms: 250,
        }
    }
}

/// Snapshots of the engine state ([`crate::serve::snapshot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotSettings {
    /// Folder for the snapshots (a persistent volume in Kubernetes). Unset:
    /// no snapshots, and every start re-reads the log from its beginning up
    /// to the committed offsets.
    pub dir: Option<std::path::PathBuf>,
    /// Least time between two snapshots, seconds. A snapshot is taken after
    /// a published batch or when the stream goes idle, and at shutdown.
    /// Default 300.
    pub every_secs: u64,
    /// Snapshots kept (the newest). At start the newest one the committed
    /// offsets cover is used: a snapshot taken after a batch whose offsets
    /// were not committed yet is passed over for an older one, so at least
    /// 2. Default 3.
    pub keep: usize,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        Self {
            dir: None,
            every_secs: 300,
            keep: 3,
        }
    }
}

/// Incremental propagation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphSettings {
    /// Largest change of a propagated row (per coordinate, relative to the
    /// RMS of the input values) that may be held back instead of propagated
    /// further (`graph::PropagatorConfig::tolerance`); an item's embedding is
    /// also re-fused and republished only once its propagated rows moved
    /// past it. 0 is exact: every edit recomputes its whole `M`-hop ball,
    /// which on a dense power-law catalogue is most of the graph. Default
    /// 1e-2: on the 100K-item benchmark catalogue (`thaw bench`, inputs with
    /// cosine ~0.5 between items) a batch of 1,000 new edges costs about
    /// 1/90 of a full propagation, and no propagated value is off by more
    /// than about 1% of their RMS (3e-3: 1/60 and 0.9%; 3e-2: 1/170 and
    /// 2.2%). Whenever the stream is idle the engine
    /// recomputes the propagation in full and republishes what the held-back
    /// changes moved, so an idle engine is exact.
    pub tolerance: f32,
    /// Items whose embedding changed only through propagation (the ripple
    /// of an edit through the graph, as opposed to an edge's endpoints or a
    /// new item, which are published with their batch) are re-fused and
    /// published at most this often, ms, and whenever the stream is idle.
    /// Default 1000: a hub that gains edges every batch would otherwise
    /// republish its whole neighbourhood with every batch. 0: every batch.
    pub ripple_ms: u64,
    /// While the engine is behind its input (batches queue up in front of
    /// the core, as when it starts on a backlog), propagation, fusion,
    /// adaptation and publishing are held back for up to this many ms and
    /// then done once for everything that arrived meanwhile: far less work
    /// per event, the same state, and every offset still committed only
    /// after its effects are in Redis. Default 2000. 0: every batch is
    /// propagated and published as it comes.
    pub catch_up_ms: u64,
    /// A placeholder (the slot of an id seen only in relations or
    /// interactions, whose item event has not come) that no event has named
    /// for this long, event time, is removed from the graph with its edges,
    /// and from the users' histories; the id starts afresh if it comes back.
    /// 0 (the default): never, and `max_placeholders` alone bounds them.
    /// Off by default because event time is the data's own and the engine's
    /// clock is the latest event time of any partition: replaying months of
    /// history (the demo does), one topic read ahead of another can move the
    /// clock past placeholders whose item events are still unread, and a
    /// TTL removes them, edges and all, where offline evaluation keeps them
    /// (with 7 days, 293 of 333 demo lists stayed equal to `thaw eval`'s;
    /// off, 311).
    pub placeholder_ttl_secs: u64,
    /// Most placeholders kept; above it, the least recently named are
    /// removed, down to 90%. Each costs a described item's propagation rows
    /// (`relations × (hops + 1) × dim` floats, about 5 KB with the
    /// reference model). Default 100,000: a replay that reads its
    /// interactions topic ahead of its items topic names many ids before
    /// their item events (Last.FM has 17,632 items), and those must not be
    /// expired; a stream that names ids it never describes stops here.
    pub max_placeholders: usize,
}

impl Default for GraphSettings {
    fn default() -> Self {
        Self {
            tolerance: 1e-2,
            ripple_ms: 1000,
            catch_up_ms: 2000,
            placeholder_ttl_secs: 0,
            max_placeholders: 100_000,
        }
    }
}

/// Redis output. `Debug` masks the URL's password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Connection URL (a seed node's, with `cluster`).
    pub url: String,
    /// `url` is a node of a Redis Cluster: writes are routed by slot, in
    /// pipelines grouped by node (a user's keys share a hash tag, so its
    /// list's transaction stays on one node).
    pub cluster: bool,
    /// Key prefix (`thaw` gives `thaw:model`, `thaw:{version}:item:{id}` ...;
    /// no `{` or `}`, which Redis Cluster reads as a hash tag).
    pub prefix: String,
    /// First retry delay after a failed write, ms; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// Approximate cap of the `updates` stream (XADD MAXLEN ~).
    pub updates_maxlen: usize,
    /// Most commands per pipeline (one MULTI/EXEC each).
    pub pipeline_commands: usize,
    /// Pipelines in flight at once on the connection. Default 4: enough to
    /// keep Redis busy while the next pipeline is sent, few enough that the
    /// last one's reply does not wait behind a whole batch's.
    pub pipelines_in_flight: usize,
    /// Longest wait for a reply, ms, before the write counts as failed and
    /// is retried. Default 10000 (the client library's own default, 500 ms,
    /// timed out pipelines that were only queued behind others).
    pub response_timeout_ms: u64,
    /// Every this long, ms, the publisher checks that Redis still holds the
    /// model marker (`{prefix}:model`); when it is gone (a Redis restart
    /// without persistence, a flush) everything is published again. 0: never.
    pub repair_check_ms: u64,
    /// After a model swap flips `{prefix}:model` to the new version, the old
    /// version's keys expire after this long, s: a reader that resolved the
    /// old version just before the flip still finds its keys. 0: they are
    /// deleted at once.
    pub old_version_ttl_secs: u64,
    /// Expiry of user keys, s (set by the engine from `users.ttl_secs`).
    #[serde(skip)]
    pub user_ttl_secs: Option<u64>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &crate::redact::url(&self.url))
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("retry_initial_ms", &self.retry_initial_ms)
            .field("retry_max_ms", &self.retry_max_ms)
            .field("updates_maxlen", &self.updates_maxlen)
            .field("pipeline_commands", &self.pipeline_commands)
            .field("pipelines_in_flight", &self.pipelines_in_flight)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("repair_check_ms", &self.repair_check_ms)
            .field("old_version_ttl_secs", &self.old_version_ttl_secs)
            .field("user_ttl_secs", &self.user_ttl_secs)
            .finish()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            prefix: "thaw".into(),
            retry_initial_ms: 50,
            retry_max_ms: 5000,
            updates_maxlen: 100_000,
            pipeline_commands: 4096,
            pipelines_in_flight: 4,
            response_timeout_ms: 10_000,
            repair_check_ms: 5_000,
            old_version_ttl_secs: 300,
            user_ttl_secs: None,
        }
    }
}

/// Model folders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// Folder written by `thaw train` (`model.json`, ONNX graphs).
    pub dir: PathBuf,
    /// The text encoder's folder (from `onnx/setup.sh`).
    pub text_dir: PathBuf,
    /// ONNX Runtime library; default: `ORT_DYLIB_PATH`, else the path recorded
    /// by `onnx/setup.sh` in the text encoder's folder.
    pub ort_dylib: Option<PathBuf>,
    /// Every this many seconds, check `model.json` for a new version and
    /// switch to it (0: never).
    pub reload_check_secs: u64,
    /// Text encoder sessions run side by side by the text stage (0: one per
    /// core, at most 4).
    pub text_threads: usize,
}

impl ModelSettings {
    /// [`ModelSettings::text_threads`], 0 resolved.
    pub fn text_threads(&self) -> usize {
        match self.text_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            n => n,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            dir: "models/mpkg".into(),
            text_dir: "models/text".into(),
            ort_dylib: None,
            reload_check_secs: 10,
            text_threads: 0,
        }
    }
}

/// Input batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Validation limits of events.
    pub limits: Limits,
    /// A batch closes this long after its first message, ms (propagation and
    /// inference are batched over it).
    pub window_ms: u64,
    /// ... or when it holds this many messages; the core also merges the
    /// batches queued behind the one it takes, up to this many messages.
    /// Default 20,000: when the engine is behind (a catch-up, a burst),
    /// large batches share one propagation pass and one publish, while at a
    /// steady rate the window closes batches long before.
    pub max_batch: usize,
    /// Batches in flight between stages (bounded channels: backpressure).
    pub queue: usize,
    /// After this long without a message, ms, the engine refreshes every
    /// user's list against the current catalogue (see `UserSettings`).
    pub idle_ms: u64,
    /// An event's `ts` may be at most this far ahead of its Kafka timestamp,
    /// ms; a later one is capped to it (and counted in
    /// `thaw_ingest_future_timestamps_capped_total`).
    pub max_future_ms: u64,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            window_ms: 20,
            max_batch: 20_000,
            queue: 2,
            idle_ms: 1000,
            max_future_ms: 300_000,
        }
    }
}

/// Users and their recommendation lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserSettings {
    /// Length of `recs` lists.
    pub top_k: usize,
    /// Adaptation settings; `None` fields come from `model.json`.
    pub adapt: Option<AdaptConfig>,
    /// When idle, refresh every user (true) so lists follow catalogue changes,
    /// or only users with new interactions (false).
    pub refresh_all_when_idle: bool,
    /// Most users kept in memory (and in Redis); above it the least recently
    /// active are evicted, down to 90%. Default 1,000,000 (about 1 GB,
    /// [`crate::serve::memory::USER_BYTES`] each).
    pub max_users: usize,
    /// A user without an interaction for this long (event time) is evicted,
    /// and their Redis keys expire after it; 0 (the default): never.
    /// Replaying old data with a TTL evicts by the data's own clock.
    pub ttl_secs: u64,
}

impl UserSettings {
    /// The engine's user bounds.
    pub fn bounds(&self) -> crate::serve::state::UserBounds {
        crate::serve::state::UserBounds {
            max_users: self.max_users.max(1),
            ttl_ms: self.ttl_secs.saturating_mul(1000),
        }
    }
}

impl UserSettings {
    /// The adaptation the engine runs with `card`'s model: these settings'
    /// own, else the model's (`model.json`'s `user_adapt`); either way with
    /// the model's meta-learned steps when it has them and `meta_learned` is on.
    pub fn adapt_for(&self, card: &crate::train::ModelCard) -> AdaptConfig {
        match &self.adapt {
            Some(a) => a.clone().with_meta(card.meta_adapt.as_ref()),
            None => card.user_adapt.clone(),
        }
    }
}

impl Default for UserSettings {
    fn default() -> Self {
        Self {
            top_k: 100,
            adapt: None,
            refresh_all_when_idle: true,
            max_users: 1_000_000,
            ttl_secs: 0,
        }
    }
}

/// HTTP endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// `/metrics`, `/healthz`, `/readyz` listen here. Loopback by default;
    /// in a pod, `0.0.0.0:9464` (the Helm chart sets it) so that the kubelet
    /// and Prometheus reach it.
    pub listen: String,
    /// A request's headers must arrive within this, ms (an idle keep-alive
    /// connection is closed after it too).
    pub header_timeout_ms: u64,
    /// A connection is closed after this, ms, whatever it does.
    pub connection_timeout_ms: u64,
    /// Most connections open at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            header_timeout_ms: 5_000,
            connection_timeout_ms: 60_000,
            max_connections: 256,
        }
    }
}

/// Environment names (after `THAW__`) of Kafka properties.
const PROPERTIES_ENV: &str = "KAFKA__PROPERTIES__";

/// The librdkafka property an environment name (after `THAW__`) sets.
fn property_name(key: &str) -> Option<String> {
    let n = key.get(..PROPERTIES_ENV.len())?;
    if !n.eq_ignore_ascii_case(PROPERTIES_ENV) {
        return None;
    }
    let name = &key[PROPERTIES_ENV.len()..];
    if name.is_empty() {
        return None;
    }
    Some(if name.contains('.') {
        name.to_string()
    } else {
        name.to_ascii_lowercase().replace('_', ".")
    })
}

impl Settings {
    /// Defaults, then `file` (TOML) if given, then `THAW__SECTION__KEY`
    /// environment variables.
    ///
    /// librdkafka property names hold dots, which the `__` split would read
    /// as nesting: `THAW__KAFKA__PROPERTIES__<name>` is taken whole instead,
    /// the name verbatim when it has a dot (`...__sasl.password`, as a pod's
    /// env allows) or lowercased with `_` read as `.` (`...__SASL_PASSWORD`;
    /// librdkafka names have no `_`).
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let env = Env::prefixed("THAW__")
            .filter(|k| !k.as_str().to_ascii_uppercase().starts_with(PROPERTIES_ENV))
            .split("__");
        // vars_os: a variable that is not UTF-8 must not panic here.
        let props = std::env::vars_os()
            .filter_map(|(k, v)| {
                let name = property_name(k.to_str()?.strip_prefix("THAW__")?)?;
                Some((name, v.into_string().ok()?))
            })
            .collect();
        Self::load_with_env(file, env, props)
    }

    fn load_with_env(file: Option<&Path>, env: Env, props: Vec<(String, String)>) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(f) = file {
            if !f.is_file() {
                bail!("config file {} does not exist", f.display());
            }
            fig = fig.merge(Toml::file(f));
        }
        let mut s: Settings = fig
            .merge(env)
            .extract()
            .context("reading the settings (defaults, file, THAW__ environment)")?;
        s.kafka.properties.extend(props);
        s.validate()?;
        Ok(s)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        crate::kafka::check_brokers(&self.kafka.brokers)?;
        if self.ingest.max_batch == 0 || self.ingest.queue == 0 {
            bail!("ingest.max_batch and ingest.queue must be at least 1");
        }
        if self.users.top_k == 0 {
            bail!("users.top_k must be at least 1");
        }
        crate::publish::keys::check_part("redis.prefix", &self.redis.prefix)?;
        if self.redis.pipeline_commands < 16 {
            bail!("redis.pipeline_commands must be at least 16");
        }
        if self.snapshot.dir.is_some() && self.snapshot.keep < 2 {
            // The newest is often ahead of the committed offsets: the one
            // before it is what a crash right after a snapshot restores.
            bail!("snapshot.keep must be at least 2 (or leave snapshot.dir unset)");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn a_settings_dump_shows_no_secret() {
        let mut s = Settings::default();
        s.redis.url = "rediss://app:hunter2@r:6380".into();
        s.kafka
            .properties
            .insert("sasl.password".into(), "hunter3".into());
        s.kafka
            .properties
            .insert("sasl.username".into(), "app".into());
        let shown = format!("{s:?} {s:#?}");
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"));
        assert!(shown.contains("sasl.username") && shown.contains("r:6380"));
    }

    #[test]
    fn defaults_then_file_then_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "thaw.toml",
                "[kafka]\nbrokers = \"k1:9092\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n[users]\ntop_k = 20\n",
            )?;
            jail.set_env("THAW__USERS__TOP_K", "7");
            jail.set_env("THAW__REDIS__URL", "redis://r:1");
            // Kafka properties from a Secret, both spellings.
            jail.set_env("THAW__KAFKA__PROPERTIES__sasl.password", "hunter2");
            jail.set_env("THAW__KAFKA__PROPERTIES__SASL_USERNAME", "app");
            let s = Settings::load(Some(Path::new("thaw.toml"))).map_err(|e| e.to_string())?;
            let prop = |k: &str| s.kafka.properties.get(k).map(String::as_str);
            assert_eq!(prop("sasl.password"), Some("hunter2"));
            assert_eq!(prop("sasl.username"), Some("app"));
            assert_eq!(s.kafka.brokers, "k1:9092");
            assert_eq!(
                s.kafka
                    .properties
                    .get("security.protocol")
                    .map(String::as_str),
                Some("SASL_SSL")
            );
            assert_eq!(s.users.top_k, 7);
            assert_eq!(s.redis.url, "redis://r:1");
            assert_eq!(s.ingest.window_ms, 20);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[kafka]\nbrokerz = \"x\"\n")?;
            let e = Settings::load(Some(Path::new("a.toml"))).unwrap_err();
            assert!(format!("{e:#}").contains("brokerz"), "{e:#}");
            jail.create_file("b.toml", "[users]\ntop_k = 0\n")?;
            assert!(Settings::load(Some(Path::new("b.toml"))).is_err());
            assert!(Settings::load(Some(Path::new("missing.toml"))).is_err());
            Ok(())
        });
    }
}
