//! Kafka clients and the embedded broker (`thaw broker`).
//!
//! Every client thaw makes (the engine's consumer and DLQ producer, `thaw
//! replay`'s producer) is built from [`KafkaSettings`]: the bootstrap servers,
//! the consumer group, and any librdkafka property passed through verbatim
//! (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`, ...), so a real
//! cluster with SASL/SSL needs configuration, not code.
//!
//! The embedded broker is librdkafka's mock cluster: it speaks the Kafka
//! protocol on a real TCP port, with consumer groups and offset commits, and
//! keeps everything in memory. Its brokers listen on ports chosen by
//! librdkafka; [`EmbeddedBroker::start`] can put a fixed bootstrap port in
//! front of them (a TCP relay), since clients only use the bootstrap address
//! to fetch the cluster metadata, which then names the mock brokers' own
//! ports on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// How to reach a Kafka cluster. `Debug` masks secret properties.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port`.
    pub brokers: String,
    /// The engine's consumer group.
    pub group_id: String,
    /// librdkafka properties passed through verbatim to every client
    /// (SASL/SSL, timeouts, ...). They override thaw's own settings.
    pub properties: BTreeMap<String, String>,
    /// Scale-out: this replica's name, unique among the replicas and stable
    /// across its restarts (a StatefulSet pod's name). Empty: one instance.
    /// With a name, the replica reads every topic in full in a group of its
    /// own (`{group_id}.{replica_id}`) and publishes the users of the
    /// `interactions` partitions that `group_id` assigns it
    /// ([`crate::serve::replica`]).
    pub replica_id: String,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("properties", &crate::redact::properties(&self.properties))
            .field("replica_id", &self.replica_id)
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "thaw".into(),
            properties: BTreeMap::new(),
            replica_id: String::new(),
        }
    }
}

impl KafkaSettings {
    /// Settings for `brokers` with defaults otherwise.
    pub fn with_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// The group of the consumer that reads the topics: `group_id`, or a
    /// group of this replica's own when scaled out.
    pub fn reader_group(&self) -> String {
        if self.replica_id.is_empty() {
            self.group_id.clone()
        } else {
            format!("{}.{}", self.group_id, self.replica_id)
        }
    }

    /// A client configuration: `bootstrap.servers`, then `own` (thaw's
    /// settings for this client), then the pass-through properties.
    pub fn client_config(&self, own: &[(&str, &str)]) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in own {
            cfg.set(*k, *v);
        }
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    /// A producer configuration: idempotent (no duplicates from retries,
    /// per-partition order kept), acks from all in-sync replicas.
    pub fn producer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("message.timeout.ms", "30000"),
        ])
    }
}

/// One topic of `streams/topics.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Replication factor on a real cluster.
    pub replication_factor: i32,
}

#[derive(Deserialize)]
struct TopicsFile {
    topics: Vec<TopicSpec>,
}

/// The topics of `streams/topics.json`, compiled in so the binary needs no
/// file at run time.
pub fn topics() -> Vec<TopicSpec> {
    let file: TopicsFile = serde_json::from_str(include_str!("../streams/topics.json"))
        .expect("streams/topics.json is valid (tested)");
    file.topics
}

/// A topic's `config` value in `streams/topics.json` (compiled in).
pub fn topic_config(topic: &str, key: &str) -> Option<String> {
    let file: serde_json::Value = serde_json::from_str(include_str!("../streams/topics.json"))
        .expect("streams/topics.json is valid (tested)");
    file["topics"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == topic)?["config"][key]
        .as_str()
        .map(str::to_string)
}

/// Most message bytes librdkafka's mock cluster keeps per partition
/// (`rd_kafka_mock_partition_init`: 5 MiB, and 100,000 message sets).
pub const MOCK_PARTITION_BYTES: usize = 5 * 1024 * 1024;

/// The embedded Kafka-protocol broker: librdkafka's mock cluster with thaw's
/// topics created, optionally behind a fixed bootstrap port.
///
/// For demos, tests and benchmarks only. The mock cluster keeps at most
/// [`MOCK_PARTITION_BYTES`] of messages per partition (a limit compiled into
/// librdkafka) and drops the oldest beyond it, so it is no system of record:
/// production runs against a real Kafka cluster.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
    relay: Option<tokio::task::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Takes the broker down (`true`: connections refused, as in an
    /// outage) or brings it back (chaos tests).
    pub fn set_down(&self, down: bool) -> Result<()> {
        if down {
            self.cluster.broker_down(1)?;
        } else {
            self.cluster.broker_up(1)?;
        }
        Ok(())
    }

    /// Starts a one-broker mock cluster and creates every topic of
    /// `streams/topics.json` (replication 1). With `listen`, a relay on that
    /// address forwards to the mock broker, and it is the bootstrap address
    /// given to clients. Needs a tokio runtime when `listen` is set.
    pub async fn start(listen: Option<SocketAddr>) -> Result<Self> {
        Self::start_with_partitions(listen, &BTreeMap::new()).await
    }

    /// [`EmbeddedBroker::start`] with more partitions for some topics (name
    /// to partitions; never fewer than `streams/topics.json` gives), so that
    /// a large load fits the mock's [`MOCK_PARTITION_BYTES`] per partition.
    pub async fn start_with_partitions(
        listen: Option<SocketAddr>,
        partitions: &BTreeMap<String, i32>,
    ) -> Result<Self> {
        let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
        for t in topics() {
            let n = partitions
                .get(&t.name)
                .copied()
                .unwrap_or(t.partitions)
                .max(t.partitions);
            cluster
                .create_topic(&t.name, n, 1)
                .with_context(|| format!("creating topic {}", t.name))?;
        }
        let inner = cluster.bootstrap_servers();
        let (bootstrap, relay) = match listen {
            None => (inner, None),
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let local = listener.local_addr()?;
                let target = inner.clone();
                let relay = tokio::spawn(async move {
                    loop {
                        let Ok((mut inbound, _)) = listener.accept().await else {
                            continue;
                        };
                        let target = target.clone();
                        tokio::spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await
                            {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                });
                (local.to_string(), Some(relay))
            }
        };
        Ok(Self {
            cluster,
            bootstrap,
            relay,
        })
    }

    /// The bootstrap servers clients should use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The mock brokers' own addresses.
    pub fn broker_addresses(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.abort();
        }
    }
}

/// Writes `bootstrap` to `path` (for scripts that start `thaw broker` and
/// need its address).
pub fn write_bootstrap_file(path: &Path, bootstrap: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, format!("{bootstrap}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Checks a `host:port` list.
pub fn check_brokers(brokers: &str) -> Result<()> {
    if brokers.trim().is_empty() {
        bail!("no Kafka brokers given (--brokers host:port)");
    }
    for b in brokers.split(',') {
        let b = b.trim();
        let Some((host, port)) = b.rsplit_once(':') else {
            bail!("broker {b:?} is not host:port");
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            bail!("broker {b:?} is not host:port");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_file_parses() {
        let t = topics();
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["items", "item-relations", "interactions", "thaw-dlq"]
        );
    }

    #[test]
    fn pass_through_overrides_own_settings() {
        let mut s = KafkaSettings::with_brokers("h:1");
        s.properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        s.properties.insert("linger.ms".into(), "50".into());
        let cfg = s.producer_config();
        assert_eq!(cfg.get("bootstrap.servers"), Some("h:1"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("linger.ms"), Some("50"));
    }

    #[test]
    fn broker_lists_are_checked() {
        assert!(check_brokers("127.0.0.1:9092,k2:9093").is_ok());
        for bad in ["", "nohost", "h:notaport", ":9092"] {
            assert!(check_brokers(bad).is_err(), "{bad}");
        }
    }
}
