//! Redis output (DESIGN.md, "Redis layout"), pipelined and idempotent.
//!
//! Data keys carry the model version (`{v}` below); `{prefix}:model` names
//! the version to read:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{prefix}:model` | hash | `version`, `root` (`{prefix}:{v}`), `dim`, `relations` |
//! | `{prefix}:{v}:item:{id}` | hash | `emb` (d × f32 little-endian), `model`, `ts` (ms) |
//! | `{prefix}:{v}:user:{{user}}` | hash | same fields |
//! | `{prefix}:{v}:recs:{{user}}` | sorted set | top-K item ids by score, replaced atomically |
//! | `{prefix}:updates` | stream | `kind`, `id`, `model` per refresh (capped) |
//!
//! The user id is in braces: a Redis Cluster hash tag, so a user's two keys
//! share a slot (their list's transaction touches both). A reader resolves
//! the version first (`HGET {prefix}:model root`), then reads under it
//! ([`keys`], `examples/`). A model swap writes the new version in full,
//! then flips `{prefix}:model`, then lets the old version's keys expire
//! after `redis.old_version_ttl_secs`: a reader never mixes versions, and
//! one that resolved the old version just before the flip still finds it.
//!
//! A list is replaced in one MULTI/EXEC transaction (DEL + ZADD), so a
//! reader never sees it half replaced; the other writes are single commands,
//! atomic by themselves, and go without a transaction. Every write sets a
//! value (HSET, DEL+ZADD), so writing the same batch twice leaves the same
//! state: replays after a crash are safe.
//! A batch's pipelines go out `redis.pipelines_in_flight` at a time on one
//! multiplexed connection.
//! A failed write is retried with exponential backoff until it succeeds or
//! the engine stops; meanwhile the pipeline stages block (backpressure) and
//! no offset is stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use conn::{Conn, Packer, Routed, SlotMap};

use crate::serve::config::RedisSettings;
use crate::serve::metrics::{Health, Metrics};

pub mod conn;
pub mod stage;

/// Key names of the layout (the module docs), for writers and readers.
pub mod keys {
    /// The marker: which version to read.
    pub fn model(prefix: &str) -> String {
        format!("{prefix}:model")
    }

    /// The root of a version's keys.
    pub fn root(prefix: &str, version: &str) -> String {
        format!("{prefix}:{version}")
    }

    /// An item's embedding, under `root` ([`root`]).
    pub fn item(root: &str, id: &str) -> String {
        format!("{root}:item:{id}")
    }

    /// A user's embedding, under `root`; the id is the hash tag.
    pub fn user(root: &str, id: &str) -> String {
        format!("{root}:user:{{{id}}}")
    }

    /// A user's list, under `root`; the id is the hash tag.
    pub fn recs(root: &str, id: &str) -> String {
        format!("{root}:recs:{{{id}}}")
    }

    /// The updates stream.
    pub fn updates(prefix: &str) -> String {
        format!("{prefix}:updates")
    }

    /// Refuses a prefix or version that would break the layout: empty, or
    /// with `{`, `}` (a Redis Cluster hash tag would form before the
    /// user's) or whitespace.
    pub fn check_part(what: &str, s: &str) -> anyhow::Result<()> {
        if s.is_empty() || s.contains(['{', '}']) || s.chars().any(char::is_whitespace) {
            anyhow::bail!("{what} {s:?} must be non-empty, without braces or spaces");
        }
        Ok(())
    }
}

/// An item embedding to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemOut {
    /// Item id.
    pub id: String,
    /// Embedding.
    pub emb: Vec<f32>,
    /// Time of the item's latest item event, ms.
    pub ts: u64,
}

/// A user embedding and list to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct UserOut {
    /// User id.
    pub id: String,
    /// Adapted embedding.
    pub emb: Vec<f32>,
    /// Time of the user's latest interaction, ms.
    pub ts: u64,
    /// Top-K item ids with scores, best first (the user's own items excluded).
    pub recs: Vec<(String, f32)>,
}

/// What one batch changed, to publish.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    /// Item embeddings.
    pub items: Vec<ItemOut>,
    /// Users.
    pub users: Vec<UserOut>,
    /// `(kind, kafka timestamp ms)` of the events whose effects this carries
    /// (kinds `item`, `edge`, `user`), for freshness.
    pub sources: Vec<(&'static str, i64)>,
    /// Users the engine evicted (`users.max_users`, `users.ttl_secs`): their
    /// keys are deleted.
    pub evicted: Vec<String>,
}

impl Publish {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.users.is_empty() && self.evicted.is_empty()
    }
}

/// Little-endian bytes of an embedding.
pub fn emb_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The embedding of little-endian bytes (`None` if the length is not a
/// multiple of 4).
pub fn emb_from_bytes(b: &[u8]) -> Option<Vec<f32>> {
    b.len().is_multiple_of(4).then(|| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// A Redis client for `url`; the error names the URL with its password
/// masked (the client's own error never quotes it).
pub fn client(url: &str) -> Result<redis::Client> {
    redis::Client::open(url)
        .map_err(|e| anyhow::anyhow!("invalid Redis URL {}: {e}", crate::redact::url(url)))
}

/// The Redis writer.
pub struct Publisher {
    cfg: RedisSettings,
    client: conn::Client,
    conn: Option<Conn>,
    /// A cluster's slot map (read at connect, again after a failure).
    slots: Option<Arc<SlotMap>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Scaled out: this replica's share ([`crate::serve::replica`]).
    ownership: Option<Arc<crate::serve::replica::Ownership>>,
    /// The version whose keys [`Publisher::prepare_version`] checked last.
    prepared: Option<String>,
}

impl Publisher {
    /// A publisher for `cfg.url` (no connection is made yet).
    pub fn new(cfg: RedisSettings, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Self> {
        let client = conn::Client::open(&cfg.url, cfg.cluster, Self::timeout(&cfg))?;
        Ok(Self {
            cfg,
            client,
            conn: None,
            slots: None,
            metrics,
            health,
            ownership: None,
            prepared: None,
        })
    }

    /// Scaled out: the model flips once every replica wrote its share
    /// ([`Publisher::flip`]).
    pub fn with_ownership(
        mut self,
        ownership: Option<Arc<crate::serve::replica::Ownership>>,
    ) -> Self {
        self.ownership = ownership;
        self
    }

    /// Whether this is one replica of several.
    pub fn scaled_out(&self) -> bool {
        self.ownership.is_some()
    }

    fn root(&self, version: &str) -> String {
        keys::root(&self.cfg.prefix, version)
    }

    fn timeout(cfg: &RedisSettings) -> Duration {
        Duration::from_millis(cfg.response_timeout_ms.max(1))
    }

    async fn conn(&mut self) -> redis::RedisResult<Conn> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let mut c = self.client.connect(Self::timeout(&self.cfg), None).await?;
        if matches!(c, Conn::Cluster(_)) {
            let seed = self.cfg.url.clone();
            let host = redis::Client::open(seed.as_str())
                .ok()
                .and_then(|c| match c.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(h, _)
                    | redis::ConnectionAddr::TcpTls { host: h, .. } => Some(h.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            self.slots = Some(Arc::new(SlotMap::fetch(&mut c, &host).await?));
        }
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// A packer for this Redis (by node on a cluster; call after
    /// [`Publisher::conn`], which reads the slot map).
    fn packer(&self) -> Packer {
        Packer::new(self.cfg.pipeline_commands, self.slots.clone())
    }

    /// [`Publisher::run`] of what `pack` adds to a packer: connects first,
    /// so that a cluster's pipelines are grouped by its current slot map.
    async fn write(
        &mut self,
        stop: &tokio::sync::watch::Receiver<bool>,
        pack: impl FnOnce(&mut Packer),
    ) -> Result<()> {
        // A failed connect is retried by `run`; the packing then goes by
        // what is known (a stale map: `run` repacks after a failure).
        let _ = self.conn().await;
        let mut packer = self.packer();
        pack(&mut packer);
        let (writes, notices) = packer.finish_ordered();
        self.run(writes, stop).await?;
        self.run(notices, stop).await
    }

    /// Runs `pipes`, each retried until it succeeds; gives up only when
    /// `stop` turns true (then returns an error).
    async fn run(
        &mut self,
        pipes: Vec<Routed>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        // All pipelines of a batch go out at once on the multiplexed
        // connection (they touch distinct keys, so their order does not
        // matter); the ones that fail are retried.
        let mut pending = pipes;
        let mut delay = Duration::from_millis(self.cfg.retry_initial_ms.max(1));
        while !pending.is_empty() {
            let t0 = Instant::now();
            let conn = self.conn().await;
            let (failed, error) = match conn {
                Ok(c) => {
                    use futures::stream::StreamExt;
                    let results: Vec<(Routed, redis::RedisResult<()>)> =
                        futures::stream::iter(pending.into_iter().map(move |r| {
                            let mut c = c.clone();
                            async move {
                                let res = c.send(&r.pipe, r.slot).await;
                                (r, res)
                            }
                        }))
                        .buffered(self.cfg.pipelines_in_flight.max(1))
                        .collect()
                        .await;
                    let mut failed = Vec::new();
                    let mut error = None;
                    let mut written = 0;
                    for (r, res) in results {
                        match res {
                            Ok(()) => written += r.writes,
                            Err(e) => {
                                error = Some(e);
                                failed.push(r);
                            }
                        }
                    }
                    if written > 0 {
                        self.metrics
                            .redis_write(written, t0.elapsed().as_secs_f64());
                    }
                    (failed, error)
                }
                Err(e) => (pending, Some(e)),
            };
            pending = failed;
            match error {
                None => {
                    self.health
                        .redis_ok
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Some(e) => {
                    self.metrics.redis_error();
                    // A reply that timed out behind a burst is no outage:
                    // readiness says "redis unavailable" only when Redis does
                    // not answer a PING of its own.
                    let up = e.is_timeout() && self.answers().await;
                    self.health
                        .redis_ok
                        .store(up, std::sync::atomic::Ordering::SeqCst);
                    self.conn = None;
                    tracing::debug!(
                        retry_ms = delay.as_millis() as u64,
                        pipelines = pending.len(),
                        "Redis write retry"
                    );
                    crate::serve::error::EngineError::retryable(
                        crate::serve::error::Stage::Publish,
                        anyhow::anyhow!("Redis write failed: {e}"),
                    )
                    .report(&self.metrics);
                    if *stop.borrow() {
                        anyhow::bail!("stopping with an unpublished batch: {e}");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(self.cfg.retry_max_ms.max(1)));
                    if self.slots.is_some() {
                        // A slot may have moved: read the map again and
                        // pack the failed units by it.
                        let _ = self.conn().await;
                        let mut packer = self.packer().per_slot();
                        for r in &pending {
                            packer.add_pipeline(&r.pipe);
                        }
                        pending = packer.finish();
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether Redis answers a PING on a connection of its own within 2 s.
    async fn answers(&self) -> bool {
        let two = Duration::from_secs(2);
        let Ok(mut c) = self.client.connect(two, Some(two)).await else {
            return false;
        };
        redis::cmd("PING").query_async::<()>(&mut c).await.is_ok()
    }

    /// Whether Redis holds the model marker (`{prefix}:model`); `None` when
    /// it does not answer (one try: the next check tries again).
    pub async fn marker_present(&mut self) -> Option<bool> {
        let mut c = self.conn().await.ok()?;
        redis::cmd("EXISTS")
            .arg(keys::model(&self.cfg.prefix))
            .query_async::<i64>(&mut c)
            .await
            .ok()
            .map(|n| n > 0)
    }

    /// The check interval of [`Publisher::marker_present`] (`None`: never).
    pub fn repair_check(&self) -> Option<Duration> {
        (self.cfg.repair_check_ms > 0).then(|| Duration::from_millis(self.cfg.repair_check_ms))
    }

    /// Checks the connection (PING), retrying like a write.
    pub async fn ping(&mut self, stop: &tokio::sync::watch::Receiver<bool>) -> Result<()> {
        let mut p = redis::pipe();
        p.cmd("PING");
        let ping = Routed {
            pipe: p,
            slot: None,
            writes: 0,
        };
        self.run(vec![ping], stop).await
    }

    /// Writes one batch's effects under model `version`.
    pub async fn publish(
        &mut self,
        batch: &Publish,
        version: &str,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        keys::check_part("the model version", version)?;
        let root = self.root(version);
        let updates = keys::updates(&self.cfg.prefix);
        let maxlen = redis::streams::StreamMaxlen::Approx(self.cfg.updates_maxlen);
        self.prepare_version(version, stop).await?;
        if !batch.evicted.is_empty() {
            // Deletions first, on their own: the pipelines below run
            // concurrently and must not race a write of the same key.
            self.write(stop, |packer| {
                for id in &batch.evicted {
                    let (user, recs) = (keys::user(&root, id), keys::recs(&root, id));
                    packer.add(&user, 1, |p| {
                        p.del(&[&user, &recs]).ignore();
                    });
                }
            })
            .await?;
        }
        let ttl = self.cfg.user_ttl_secs.filter(|&t| t > 0);
        self.write(stop, |packer| {
            for it in &batch.items {
                let key = keys::item(&root, &it.id);
                packer.add(&key, 1, |p| {
                    p.hset_multiple(&key, &embedding_fields(&it.emb, version, it.ts))
                        .ignore();
                });
                notice(packer, &updates, maxlen, "item", it.id.as_str(), version);
            }
            for u in &batch.users {
                let user = keys::user(&root, &u.id);
                packer.add(&user, 3 + 2 * ttl.is_some() as usize, |p| {
                    user_cmds(p, u, &root, version, ttl);
                });
                notice(packer, &updates, maxlen, "user", u.id.as_str(), version);
            }
        })
        .await?;
        self.metrics.published("item", batch.items.len() as u64);
        self.metrics.published("user", batch.users.len() as u64);
        self.metrics.published("recs", batch.users.len() as u64);
        Ok(())
    }

    /// The model version Redis serves now (`{prefix}:model` `version`).
    pub async fn active_version(
        &mut self,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<String>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(keys::model(&self.cfg.prefix))
            .arg("version")
            .arg("root");
        let (v, root): (Option<String>, Option<String>) = self.query(&cmd, stop).await?;
        // A marker of an older layout (no `root`) names no readable version.
        Ok(v.filter(|v| root.as_deref() == Some(self.root(v).as_str())))
    }

    /// `cmd`'s reply, retried like a write until it comes or `stop`.
    async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<T> {
        let mut delay = Duration::from_millis(self.cfg.retry_initial_ms.max(1));
        loop {
            let res = match self.conn().await {
                Ok(mut c) => cmd.query_async::<T>(&mut c).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.metrics.redis_error();
                    self.conn = None;
                    if *stop.borrow() {
                        anyhow::bail!("stopping with a Redis read unanswered: {e}");
                    }
                    tracing::debug!(retry_ms = delay.as_millis() as u64, error = %e, "Redis read retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(self.cfg.retry_max_ms.max(1)));
                }
            }
        }
    }

    /// Before this publisher's first write under `version`: when Redis does
    /// not serve it (a swap to it, or back to it), clears the expiry a
    /// demotion may have set on its keys, so that a version flipped away
    /// from and back to within `redis.old_version_ttl_secs` keeps them.
    async fn prepare_version(
        &mut self,
        version: &str,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        if self.prepared.as_deref() == Some(version) {
            return Ok(());
        }
        if self.active_version(stop).await?.as_deref() != Some(version) {
            let n = self
                .each_key(version, stop, |p, k| {
                    p.persist(k).ignore();
                })
                .await?;
            if n > 0 {
                tracing::info!(
                    version,
                    keys = n,
                    "writing a version again: its keys no longer expire"
                );
            }
        }
        self.prepared = Some(version.to_string());
        Ok(())
    }

    /// After this publisher wrote its share of `version` (`shares`; `None`:
    /// one instance, the whole): flips the marker to it, alone at once;
    /// scaled out, once every share is written (each replica adds the
    /// shares it wrote to `{root}:shares`; the one that completes the set
    /// flips). Whether the marker now names `version`.
    pub async fn flip(
        &mut self,
        version: &str,
        dim: usize,
        relations: &[String],
        shares: Option<&[String]>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool> {
        let (Some(o), Some(shares)) = (self.ownership.clone(), shares) else {
            self.set_model(version, dim, relations, stop).await?;
            return Ok(true);
        };
        let key = format!("{}:shares", self.root(version));
        if !shares.is_empty() {
            self.write(stop, |packer| {
                packer.add(&key, 1, |p| {
                    p.sadd(&key, shares).ignore();
                })
            })
            .await?;
        }
        let mut scard = redis::cmd("SCARD");
        scard.arg(&key);
        let written: usize = self.query(&scard, stop).await?;
        if self.active_version(stop).await?.as_deref() == Some(version) {
            return Ok(true);
        }
        if written < o.all_shares() {
            tracing::info!(
                version,
                written,
                of = o.all_shares(),
                "share written; the model flips when every replica has written its share"
            );
            return Ok(false);
        }
        self.set_model(version, dim, relations, stop).await?;
        Ok(true)
    }

    /// Flips `{prefix}:model` to `version` (after everything under it is
    /// written), then lets the version it replaces expire
    /// (`redis.old_version_ttl_secs`) and forgets its shares, so that a
    /// flip back to it collects them afresh.
    pub async fn set_model(
        &mut self,
        version: &str,
        dim: usize,
        relations: &[String],
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let old = self.active_version(stop).await?;
        // One HSET: the flip is atomic by itself (the updates entry is a
        // notice, in another key).
        let (marker, root) = (keys::model(&self.cfg.prefix), self.root(version));
        let updates = keys::updates(&self.cfg.prefix);
        let maxlen = redis::streams::StreamMaxlen::Approx(self.cfg.updates_maxlen);
        self.write(stop, |packer| {
            packer.add(&marker, 1, |p| {
                p.hset_multiple(
                    &marker,
                    &[
                        ("version", version.to_string()),
                        ("root", root),
                        ("dim", dim.to_string()),
                        ("relations", relations.join(",")),
                    ],
                )
                .ignore();
            });
            notice(packer, &updates, maxlen, "model", version, version);
        })
        .await?;
        if let Some(old) = old.filter(|o| o != version) {
            let ttl = self.cfg.old_version_ttl_secs as i64;
            let shares = format!("{}:shares", self.root(&old));
            let n = self
                .each_key(&old, stop, |p, k| {
                    if ttl == 0 || k == shares {
                        p.unlink(k).ignore();
                    } else {
                        p.expire(k, ttl).ignore();
                    }
                })
                .await?;
            tracing::info!(old = %old, new = %version, keys = n, ttl_secs = ttl, "model flipped; the old version's keys expire");
        }
        Ok(())
    }

    /// Runs `cmd` (added to a pipeline) on every key of `version` (SCAN
    /// walks the keyspace once, each primary's on a cluster); returns how
    /// many keys.
    async fn each_key(
        &mut self,
        version: &str,
        stop: &tokio::sync::watch::Receiver<bool>,
        cmd: impl Fn(&mut redis::Pipeline, &str),
    ) -> Result<usize> {
        let pattern = format!("{}:*", glob_escape(&self.root(version)));
        let mut delay = Duration::from_millis(self.cfg.retry_initial_ms.max(1));
        let found = loop {
            let res = match self.conn().await {
                Ok(mut c) => c.scan(&pattern, self.slots.as_deref()).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(found) => break found,
                Err(e) => {
                    self.metrics.redis_error();
                    self.conn = None;
                    if *stop.borrow() {
                        anyhow::bail!("stopping with a Redis scan unanswered: {e}");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(self.cfg.retry_max_ms.max(1)));
                }
            }
        };
        self.write(stop, |packer| {
            for k in &found {
                packer.add(k, 1, |p| cmd(p, k));
            }
        })
        .await?;
        Ok(found.len())
    }
}

/// `s` with Redis glob characters escaped (for SCAN MATCH).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The fields of an item's or user's hash: `emb`, `model`, `ts`.
fn embedding_fields(emb: &[f32], version: &str, ts: u64) -> [(&'static str, Vec<u8>); 3] {
    [
        ("emb", emb_bytes(emb)),
        ("model", version.as_bytes().to_vec()),
        ("ts", ts.to_string().into_bytes()),
    ]
}

/// The `updates` entry announcing a write of `kind` `id` under `version`,
/// sent after the writes before it ([`Packer::add_after`]).
fn notice(
    packer: &mut Packer,
    updates: &str,
    maxlen: redis::streams::StreamMaxlen,
    kind: &str,
    id: &str,
    version: &str,
) {
    packer.add_after(updates, 1, |p| {
        p.xadd_maxlen(
            updates,
            maxlen,
            "*",
            &[("kind", kind), ("id", id), ("model", version)],
        )
        .ignore();
    });
}

/// A user's writes: the embedding, then the list replaced in a transaction
/// of its own (MULTI, DEL, ZADD, EXEC: a reader sees the old list or the
/// new one), with `ttl` on both keys. Every key has the user's hash tag.
fn user_cmds(p: &mut redis::Pipeline, u: &UserOut, root: &str, version: &str, ttl: Option<u64>) {
    let user = keys::user(root, &u.id);
    p.hset_multiple(&user, &embedding_fields(&u.emb, version, u.ts))
        .ignore();
    let recs = keys::recs(root, &u.id);
    p.cmd("MULTI").ignore();
    p.del(&recs).ignore();
    if !u.recs.is_empty() {
        let members: Vec<(f64, &str)> = u
            .recs
            .iter()
            .map(|(id, s)| (*s as f64, id.as_str()))
            .collect();
        p.zadd_multiple(&recs, &members).ignore();
    } else {
        // The same number of writes either way.
        p.del(&recs).ignore();
    }
    if let Some(ttl) = ttl {
        // Redis forgets a user when the engine does (users.ttl_secs).
        p.expire(&user, ttl as i64).ignore();
        p.expire(&recs, ttl as i64).ignore();
    }
    p.cmd("EXEC").ignore();
}

/// The root of the version `{prefix}:model` names (`None`: no model yet),
/// the first read of every reader.
pub async fn resolve(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
) -> redis::RedisResult<Option<String>> {
    redis::cmd("HGET")
        .arg(keys::model(prefix))
        .arg("root")
        .query_async(conn)
        .await
}

/// Reads a user's list back (best first) from the version Redis serves,
/// for the demo and tests (empty before any model is published).
pub async fn read_recs(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    user: &str,
    k: usize,
) -> redis::RedisResult<Vec<(String, f64)>> {
    let Some(root) = resolve(conn, prefix).await? else {
        return Ok(Vec::new());
    };
    redis::cmd("ZRANGE")
        .arg(keys::recs(&root, user))
        .arg(0)
        .arg(k.saturating_sub(1) as i64)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(conn)
        .await
}

/// Deletes every key under `prefix:` (SCAN + UNLINK); returns how many.
pub async fn clear_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<usize> {
    let mut cursor: u64 = 0;
    let mut n = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            n += keys.len();
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_round_trip_little_endian() {
        let v = vec![1.0f32, -2.5, f32::MIN_POSITIVE];
        let b = emb_bytes(&v);
        assert_eq!(&b[..4], &1.0f32.to_le_bytes());
        assert_eq!(emb_from_bytes(&b).unwrap(), v);
        assert!(emb_from_bytes(&b[..5]).is_none());
    }

    /// Defect: an invalid Redis URL printed its password in the error, and
    /// a `rediss://` URL was refused (TLS not built in), also printing it.
    #[test]
    fn url_errors_never_show_the_password_and_tls_urls_are_taken() {
        let (m, h) = (Arc::new(Metrics::new()), Arc::new(Health::default()));
        for bad in [
            "redis://:hunter2@r:notaport",
            "redis//:hunter2@r:6379",
            "mysql://:hunter2@r:6379",
        ] {
            let cfg = RedisSettings {
                url: bad.into(),
                ..Default::default()
            };
            let e = Publisher::new(cfg, m.clone(), h.clone()).err().expect(bad);
            let shown = format!("{e:#}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        let tls = RedisSettings {
            url: "rediss://:hunter2@r:6380".into(),
            ..Default::default()
        };
        assert!(!format!("{tls:?}").contains("hunter2"));
        assert!(Publisher::new(tls, m, h).is_ok(), "TLS is built in");
    }
}
