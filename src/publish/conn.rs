//! One Redis or a Redis Cluster (`redis.cluster`) behind one connection
//! type, and the packing of writes into pipelines: one stream of them for a
//! single Redis; for a cluster, pipelines grouped by the node that holds
//! their keys' slots, each sent to that node.
//!
//! A write is a *unit*: one command, or a MULTI … EXEC block whose keys
//! share a slot (a user's two keys share the hash tag `{user}`, see
//! [`super::keys`]). Units are packed up to `redis.pipeline_commands` per
//! pipeline. In a cluster the slot → node map comes from `CLUSTER SLOTS`;
//! when a pipeline fails (a slot moved, a node restarted) the map is read
//! again and the failed pipelines' units are packed afresh, one pipeline per
//! slot, so a retry goes where the keys now are (and a redirect, which
//! redis-rs answers by resending the whole pipeline, covers one slot). On a
//! cluster the `updates` notices go in pipelines of their own, sent after
//! the writes they announce; on one Redis each follows its writes in the
//! same pipeline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A client for one Redis or a cluster (one per publisher: the size of
/// the variants does not matter).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Client {
    /// One Redis.
    One(redis::Client),
    /// A Redis Cluster, reached through the seed node(s) of `url`.
    Cluster(redis::cluster::ClusterClient),
}

impl Client {
    /// A client for `url` (a cluster's seed node when `cluster`); the error
    /// names the URL with its password masked.
    pub fn open(url: &str, cluster: bool, response_timeout: Duration) -> Result<Self> {
        let bad = |e: redis::RedisError| {
            anyhow::anyhow!("invalid Redis URL {}: {e}", crate::redact::url(url))
        };
        Ok(if cluster {
            Self::Cluster(
                redis::cluster::ClusterClientBuilder::new(vec![url])
                    .response_timeout(response_timeout)
                    .build()
                    .map_err(bad)?,
            )
        } else {
            Self::One(redis::Client::open(url).map_err(bad)?)
        })
    }

    /// A connection (multiplexed; a cluster's routes by key).
    pub async fn connect(
        &self,
        response_timeout: Duration,
        connect_timeout: Option<Duration>,
    ) -> redis::RedisResult<Conn> {
        match self {
            Self::One(c) => {
                let mut cfg = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(response_timeout));
                if let Some(t) = connect_timeout {
                    cfg = cfg.set_connection_timeout(Some(t));
                }
                Ok(Conn::One(
                    c.get_multiplexed_async_connection_with_config(&cfg).await?,
                ))
            }
            Self::Cluster(c) => {
                let connect = c.get_async_connection();
                match connect_timeout {
                    Some(t) => match tokio::time::timeout(t, connect).await {
                        Ok(c) => Ok(Conn::Cluster(c?)),
                        Err(_) => Err((
                            redis::ErrorKind::Io,
                            "connecting to the cluster timed out",
                        )
                            .into()),
                    },
                    None => Ok(Conn::Cluster(connect.await?)),
                }
            }
        }
    }
}

/// A connection to one Redis or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    One(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::One(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Sends `p`: on one Redis as it is; on a cluster to the node that
    /// holds `slot` (every key of `p` is on that node, [`Packer`]). A
    /// command's error reply fails the whole pipeline (its writes are
    /// idempotent: it is sent again).
    pub async fn send(&mut self, p: &Pipeline, slot: Option<u16>) -> redis::RedisResult<()> {
        match (self, slot) {
            (Self::Cluster(c), Some(slot)) => {
                let n = p.cmd_iter().count();
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                let replies = c.route_pipeline(p.clone(), 0, n, route).await?;
                match replies.iter().find_map(error_in) {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            (c, _) => p.query_async::<()>(c).await,
        }
    }

    /// `SCAN` with `pattern` over every key: on a cluster, over each
    /// primary in turn (`map`). Returns the keys.
    pub async fn scan(
        &mut self,
        pattern: &str,
        map: Option<&SlotMap>,
    ) -> redis::RedisResult<Vec<String>> {
        let mut out = Vec::new();
        let nodes: Vec<Option<(String, u16)>> = match (&*self, map) {
            (Self::Cluster(_), Some(m)) => m.primaries().into_iter().map(Some).collect(),
            _ => vec![None],
        };
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, found): (u64, Vec<String>) = match (&mut *self, &node) {
                    (Self::Cluster(c), Some((host, port))) => {
                        let v = c
                            .route_command(
                                scan,
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                }),
                            )
                            .await?;
                        redis::from_redis_value(v)?
                    }
                    (c, _) => scan.query_async(c).await?,
                };
                out.extend(found);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }
}

/// The first error reply in `v` (an EXEC's replies included).
fn error_in(v: &Value) -> Option<redis::RedisError> {
    match v {
        Value::ServerError(e) => Some(e.clone().into()),
        Value::Array(items) => items.iter().find_map(error_in),
        _ => None,
    }
}

/// A cluster's slot ranges and the primary holding each.
#[derive(Debug, Clone, Default)]
pub struct SlotMap {
    /// `(first, last, "host:port")`, sorted.
    ranges: Vec<(u16, u16, String)>,
}

impl SlotMap {
    /// Reads `CLUSTER SLOTS` through `c`; a node announced without a host
    /// (empty, `?`, NULL, or `0.0.0.0`/`::`) is taken to be on `seed`'s host,
    /// as redis-rs does.
    pub async fn fetch(c: &mut Conn, seed: &str) -> redis::RedisResult<Self> {
        let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
        let Value::Array(rows) = v else {
            return Err((redis::ErrorKind::Parse, "CLUSTER SLOTS: not an array").into());
        };
        let mut ranges = Vec::new();
        for row in rows {
            let Value::Array(f) = row else { continue };
            let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(node))) =
                (f.first(), f.get(1), f.get(2))
            else {
                continue;
            };
            let host = match node.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => String::new(),
            };
            let host = if matches!(host.as_str(), "" | "?" | "0.0.0.0" | "::") {
                seed.to_string()
            } else {
                host
            };
            let Some(Value::Int(port)) = node.get(1) else {
                continue;
            };
            ranges.push((*a as u16, *b as u16, format!("{host}:{port}")));
        }
        ranges.sort();
        if ranges.is_empty() {
            return Err((redis::ErrorKind::Parse, "CLUSTER SLOTS: no slot is served").into());
        }
        Ok(Self { ranges })
    }

    /// The primary holding `slot` (`""` when none: the write fails and the
    /// map is read again).
    pub fn node(&self, slot: u16) -> &str {
        let i = self.ranges.partition_point(|r| r.1 < slot);
        match self.ranges.get(i) {
            Some((a, _, n)) if *a <= slot => n,
            _ => "",
        }
    }

    /// Every primary, `(host, port)`.
    pub fn primaries(&self) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = self
            .ranges
            .iter()
            .filter_map(|(_, _, n)| {
                let (h, p) = n.rsplit_once(':')?;
                Some((h.to_string(), p.parse().ok()?))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A packed pipeline: where it goes, and how many of its commands write.
pub struct Routed {
    /// The commands (each reply ignored).
    pub pipe: Pipeline,
    /// On a cluster, a slot on the node every key of it is on.
    pub slot: Option<u16>,
    /// Commands that write (MULTI and EXEC not counted).
    pub writes: usize,
}

/// Packs units into pipelines of at most `limit` commands: one stream for
/// one Redis, one per node for a cluster (`map`).
pub struct Packer {
    limit: usize,
    map: Option<Arc<SlotMap>>,
    /// Group by slot rather than node (a repack after a failure: redis-rs
    /// resends a whole pipeline on a redirect, and a migrating slot's ASK
    /// covers one slot).
    per_slot: bool,
    open: BTreeMap<String, Routed>,
    done: Vec<Routed>,
    /// On a cluster, the `updates` notices, sent after the writes they
    /// announce (other nodes' pipelines are not ordered with them).
    notices: Option<Box<Packer>>,
}

impl Packer {
    /// An empty packer; `map` for a cluster.
    pub fn new(limit: usize, map: Option<Arc<SlotMap>>) -> Self {
        Self {
            limit: limit.max(1),
            map,
            per_slot: false,
            open: BTreeMap::new(),
            done: Vec::new(),
            notices: None,
        }
    }

    /// A packer that groups by slot (see the field).
    pub fn per_slot(mut self) -> Self {
        self.per_slot = true;
        self
    }

    /// Adds a notice of writes added before it (an `updates` entry): on one
    /// Redis in the same stream, right after them; on a cluster in
    /// pipelines of its own, sent once every write has landed
    /// ([`Packer::finish_ordered`]).
    pub fn add_after(&mut self, key: &str, n: usize, add: impl FnOnce(&mut Pipeline)) {
        if self.map.is_none() {
            return self.add(key, n, add);
        }
        let (limit, map) = (self.limit, self.map.clone());
        self.notices
            .get_or_insert_with(|| Box::new(Packer::new(limit, map)))
            .add(key, n, add);
    }

    /// Adds a unit: the commands `add` puts into a pipeline (`n` of them,
    /// all with keys in `key`'s slot).
    pub fn add(&mut self, key: &str, n: usize, add: impl FnOnce(&mut Pipeline)) {
        let (node, slot) = match &self.map {
            Some(_) if self.per_slot => {
                let s = slot(key.as_bytes());
                (s.to_string(), Some(s))
            }
            Some(m) => {
                let s = slot(key.as_bytes());
                (m.node(s).to_string(), Some(s))
            }
            None => (String::new(), None),
        };
        let full = self
            .open
            .get(&node)
            .is_some_and(|r| r.writes > 0 && r.writes + n > self.limit);
        if full {
            let r = self.open.remove(&node).expect("open");
            self.done.push(r);
        }
        let r = self.open.entry(node).or_insert_with(|| Routed {
            pipe: redis::pipe(),
            slot,
            writes: 0,
        });
        add(&mut r.pipe);
        r.writes += n;
    }

    /// Re-adds the units of `p` (after a failure, to repack them with a
    /// fresh map): each MULTI … EXEC block stays one unit.
    pub fn add_pipeline(&mut self, p: &Pipeline) {
        let mut block: Vec<&Cmd> = Vec::new();
        for c in p.cmd_iter() {
            let name = command_name(c);
            if name == b"MULTI" || !block.is_empty() {
                block.push(c);
                if name == b"EXEC" {
                    self.add_unit(&block);
                    block.clear();
                }
                continue;
            }
            self.add_unit(&[c]);
        }
        if !block.is_empty() {
            self.add_unit(&block);
        }
    }

    fn add_unit(&mut self, cmds: &[&Cmd]) {
        let key = cmds
            .iter()
            .find_map(|c| match c.args_iter().nth(1) {
                Some(redis::Arg::Simple(k)) if !matches!(command_name(c), b"MULTI" | b"EXEC") => {
                    Some(String::from_utf8_lossy(k).into_owned())
                }
                _ => None,
            })
            .unwrap_or_default();
        let writes = cmds
            .iter()
            .filter(|c| !matches!(command_name(c), b"MULTI" | b"EXEC"))
            .count();
        self.add(&key, writes, |p| {
            for c in cmds {
                p.add_command((*c).clone()).ignore();
            }
        });
    }

    /// The pipelines (the notices among them: call it only where order
    /// does not matter, else [`Packer::finish_ordered`]).
    pub fn finish(self) -> Vec<Routed> {
        let (mut first, then) = self.finish_ordered();
        first.extend(then);
        first
    }

    /// The pipelines of the writes, then those of the notices (empty on one
    /// Redis, where each notice follows its writes in the same stream).
    pub fn finish_ordered(mut self) -> (Vec<Routed>, Vec<Routed>) {
        self.done.extend(self.open.into_values());
        self.done.retain(|r| r.pipe.cmd_iter().next().is_some());
        let then = self.notices.map_or_else(Vec::new, |n| n.finish());
        (self.done, then)
    }
}

fn command_name(c: &Cmd) -> &[u8] {
    match c.args_iter().next() {
        Some(redis::Arg::Simple(n)) => n,
        _ => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        // An empty tag: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"thaw:v1:user:{alice}"), slot(b"thaw:v1:recs:{alice}"));
        assert_eq!(slot(b"thaw:v1:user:{alice}"), slot(b"alice"));
    }

    #[test]
    fn units_are_packed_by_node_and_kept_whole() {
        let map = SlotMap {
            ranges: vec![(0, 8191, "a:1".into()), (8192, 16383, "b:2".into())],
        };
        assert_eq!(map.node(0), "a:1");
        assert_eq!(map.node(8192), "b:2");
        assert_eq!(map.primaries(), [("a".into(), 1), ("b".into(), 2)]);
        let mut packer = Packer::new(4, Some(Arc::new(map)));
        for u in ["alice", "bob", "carol", "dave", "erin"] {
            let user = format!("r:user:{{{u}}}");
            let recs = format!("r:recs:{{{u}}}");
            packer.add(&user, 3, |p| {
                p.hset(&user, "emb", "x").ignore();
                p.cmd("MULTI").ignore();
                p.del(&recs).ignore();
                p.zadd(&recs, "i", 1).ignore();
                p.cmd("EXEC").ignore();
            });
        }
        let out = packer.finish();
        for r in &out {
            let s = r.slot.unwrap();
            let node = if s < 8192 { "a" } else { "b" };
            for c in r
                .pipe
                .cmd_iter()
                .filter(|c| !matches!(command_name(c), b"MULTI" | b"EXEC"))
            {
                let Some(redis::Arg::Simple(k)) = c.args_iter().nth(1) else {
                    panic!()
                };
                let ks = slot(k);
                assert_eq!(
                    if ks < 8192 { "a" } else { "b" },
                    node,
                    "a key on another node"
                );
            }
            assert!(
                r.writes <= 4 || r.pipe.cmd_iter().count() == 5,
                "at most 4 writes, or one unit"
            );
        }
        // Repacked from the pipelines, the same units, blocks whole.
        let mut again = Packer::new(100, None);
        for r in &out {
            again.add_pipeline(&r.pipe);
        }
        let one = again.finish();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].writes, 15);
        let names: Vec<Vec<u8>> = one[0]
            .pipe
            .cmd_iter()
            .map(|c| command_name(c).to_vec())
            .collect();
        assert_eq!(names.iter().filter(|n| n.as_slice() == b"MULTI").count(), 5);
        assert_eq!(names.len(), 25);
    }
}
