//! The engine's runtime errors. A **retryable** error is a dependency away
//! (Kafka, Redis, the dead-letter topic, a model folder mid-write): the
//! stage logs it, counts it, waits and tries again, and the stream behind it
//! waits (backpressure). A **fatal** error stops the engine: the stages
//! drain, what was published is committed, and the process exits non-zero
//! for its supervisor to restart it, when it resumes from the last commit.
//! Each error is one log line and one increment of
//! `thaw_serve_errors_total{stage, kind}`.

use super::metrics::Metrics;

/// The stage an error comes from (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Start-up: model, Redis, the restore from the log.
    Start,
    /// The consumer and the dead-letter producer.
    Ingest,
    /// The text encoder.
    Text,
    /// Graph, inference, adaptation; model reloads.
    Core,
    /// Redis writes and offsets.
    Publish,
}

impl Stage {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Ingest => "ingest",
            Stage::Text => "text",
            Stage::Core => "core",
            Stage::Publish => "publish",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine error: where, and whether the engine goes on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Retried; the engine goes on.
    #[error("{stage}: {source:#} (retried)")]
    Retryable {
        /// Where.
        stage: Stage,
        /// What.
        source: anyhow::Error,
    },
    /// The engine stops.
    #[error("{stage}: {source:#}")]
    Fatal {
        /// Where.
        stage: Stage,
        /// What.
        source: anyhow::Error,
    },
}

impl EngineError {
    /// A retryable error of `stage`.
    pub fn retryable(stage: Stage, source: impl Into<anyhow::Error>) -> Self {
        Self::Retryable {
            stage,
            source: source.into(),
        }
    }

    /// A fatal error of `stage`.
    pub fn fatal(stage: Stage, source: impl Into<anyhow::Error>) -> Self {
        Self::Fatal {
            stage,
            source: source.into(),
        }
    }

    /// Whether the engine goes on after it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// Where it happened.
    pub fn stage(&self) -> Stage {
        match self {
            Self::Retryable { stage, .. } | Self::Fatal { stage, .. } => *stage,
        }
    }

    /// The one log line and the counter of this error.
    pub fn report(&self, metrics: &Metrics) {
        let kind = if self.is_retryable() {
            tracing::warn!(stage = %self.stage(), error = %self, "engine error, retried");
            "retryable"
        } else {
            tracing::error!(stage = %self.stage(), error = %self, "engine error, stopping");
            "fatal"
        };
        metrics.error(self.stage().as_str(), kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_counts_once_under_its_stage_and_kind() {
        let m = Metrics::new();
        EngineError::retryable(Stage::Publish, anyhow::anyhow!("redis away")).report(&m);
        EngineError::retryable(Stage::Publish, anyhow::anyhow!("redis away")).report(&m);
        let fatal = EngineError::fatal(Stage::Core, anyhow::anyhow!("bad state"));
        assert!(!fatal.is_retryable());
        assert_eq!(fatal.to_string(), "core: bad state");
        fatal.report(&m);
        let t = m.encode();
        assert!(
            t.contains("thaw_serve_errors_total{stage=\"publish\",kind=\"retryable\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("thaw_serve_errors_total{stage=\"core\",kind=\"fatal\"} 1"),
            "{t}"
        );
    }
}
