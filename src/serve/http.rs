//! The engine's HTTP endpoints: `/metrics` (OpenMetrics text), `/healthz`
//! (alive) and `/readyz` (ready to serve, or why not).
//!
//! The server is hyper's HTTP/1 connection driver under limits a scraper
//! never meets and an idle or hostile client does: request headers must
//! arrive within `http.header_timeout_ms`, a connection lives at most
//! `http.connection_timeout_ms`, and at most `http.max_connections` are open
//! at once (more are closed at once). It listens on loopback unless
//! `http.listen` says otherwise (the Helm chart sets `0.0.0.0` for the
//! kubelet's probes and Prometheus).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use super::config::HttpSettings;
use super::metrics::{Health, Metrics};

/// The connection limits of [`serve_http`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's headers (also between keep-alive
    /// requests).
    pub header_timeout: Duration,
    /// Longest a connection stays open.
    pub connection_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// The limits of `s`.
    pub fn from_settings(s: &HttpSettings) -> Self {
        Self {
            header_timeout: Duration::from_millis(s.header_timeout_ms.max(1)),
            connection_timeout: Duration::from_millis(s.connection_timeout_ms.max(1)),
            max_connections: s.max_connections.max(1),
        }
    }
}

/// The routes.
fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> axum::Router {
    let (h1, h2) = (health.clone(), health);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = h1.clone();
                async move {
                    if h.live.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let h = h2.clone();
                async move {
                    match h.not_ready() {
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                        None => (StatusCode::OK, "ready"),
                    }
                }
            }),
        )
}

/// Serves the endpoints on `listener` under `limits` until `shutdown`
/// resolves; open connections are then closed.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = router(metrics, health);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: wait, do not spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream); // over the cap: closed at once
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _slot = slot;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(limits.connection_timeout) => {
                    // At the deadline: finish the request in flight, then
                    // close (a scrape on a kept-alive connection completes).
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.header_timeout, conn).await;
                }
            }
        });
    }
    conns.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }

    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Health>, impl FnOnce()) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_http(
            listener,
            Arc::new(Metrics::new()),
            health.clone(),
            limits,
            async {
                let _ = rx.await;
            },
        ));
        (addr, health, move || {
            let _ = tx.send(());
        })
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_say_what_they_mean() {
        let (addr, health, stop) = start(limits()).await;
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("restoring"),
            "{r}"
        );
        health.ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.contains("redis unavailable"));
        health.redis_ok.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        health.dlq_ok.store(false, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.contains("dead-letter topic"));
        assert!(get(addr, "/metrics").await.contains("thaw_graph_items"));
        stop();
    }

    /// Defect: 500 idle half-open connections stayed open for over 20 s.
    /// Over the cap, a connection is closed at once; under it, an idle one
    /// after the header timeout.
    #[tokio::test]
    async fn idle_connections_are_capped_then_closed() {
        let header_timeout = Duration::from_millis(1500);
        let (addr, _health, stop) = start(Limits {
            max_connections: 40,
            header_timeout,
            ..limits()
        })
        .await;
        // Half a request line each, never finished.
        let mut held = Vec::new();
        for _ in 0..40 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metr").await.unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /metr").await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut buf)).await;
            assert!(r.is_ok(), "a connection over the cap was left open");
        }
        assert!(t0.elapsed() < header_timeout, "{:?}", t0.elapsed());
        // The 40 under the cap are still open (their header timeout runs)...
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_millis(50), held[0].read(&mut buf)).await;
        assert!(r.is_err(), "closed before its header timeout");
        // ... and closed by it.
        for mut s in held {
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            assert!(r.is_ok(), "an idle connection was still open after 5 s");
        }
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        // Slots are given back: still serving.
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        stop();
    }
}
