//! Redis over TLS with AUTH, against a local `redis-server --tls-port` with a
//! certificate made here by `openssl req -x509`, trusted through
//! `SSL_CERT_FILE` (as a pod mounts a private CA), and secrets kept out of
//! every error on the way.
//!
//! One test in this binary: it sets `SSL_CERT_FILE` for the process before
//! any TLS connection is made.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Killed;
use thaw::publish::{read_recs, Publish, Publisher, UserOut};
use thaw::serve::config::RedisSettings;
use thaw::serve::metrics::{Health, Metrics};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A self-signed certificate for 127.0.0.1 and localhost.
fn certificate(dir: &Path) {
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (Debian package openssl)");
    assert!(ok.success(), "openssl req -x509 failed");
}

/// `redis-server` with TLS only (no plain port) and a password.
fn start_tls_redis(dir: &Path, port: u16, password: &str) -> Killed {
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("cert.pem"))
        .args(["--tls-auth-clients", "no", "--requirepass", password])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (`make redis` installs it)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis-server --tls-port did not start (is it built with TLS?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Killed(child)
}

fn publisher(url: &str) -> anyhow::Result<Publisher> {
    let cfg = RedisSettings {
        url: url.into(),
        prefix: "thaw-tls-test".into(),
        retry_max_ms: 100,
        ..Default::default()
    };
    Publisher::new(cfg, Arc::new(Metrics::new()), Arc::new(Health::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_auth_and_no_secret_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    certificate(dir.path());
    // SAFETY: the only test of this binary, before any thread reads the
    // environment (OpenSSL reads it when the first TLS connector is made).
    unsafe { std::env::set_var("SSL_CERT_FILE", dir.path().join("cert.pem")) };
    let port = free_port();
    let _redis = start_tls_redis(dir.path(), port, "hunter2");
    let (_tx, stop) = tokio::sync::watch::channel(false);

    // The engine's writer, over TLS, authenticated.
    let url = format!("rediss://:hunter2@127.0.0.1:{port}");
    let mut p = publisher(&url).expect("a rediss:// URL is taken");
    let mut batch = Publish::default();
    batch.users.push(UserOut {
        id: "alice".into(),
        emb: vec![0.25; 4],
        ts: 1,
        recs: vec![("m1".into(), 2.0), ("m2".into(), 1.0)],
    });
    tokio::time::timeout(Duration::from_secs(20), p.publish(&batch, "v1", &stop))
        .await
        .expect("published over TLS within 20 s")
        .expect("published over TLS");
    p.set_model("v1", 4, &[], &stop)
        .await
        .expect("the marker written over TLS");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let recs = read_recs(&mut c, "thaw-tls-test", "alice", 10)
        .await
        .unwrap();
    assert_eq!(recs.len(), 2);

    // A wrong password and a plain connection to the TLS port fail, and no
    // error shows the password.
    let (_tx2, stopping) = tokio::sync::watch::channel(true);
    for (bad, why) in [
        (
            format!("rediss://:wrongpass@127.0.0.1:{port}"),
            "wrong password",
        ),
        (
            format!("redis://:wrongpass@127.0.0.1:{port}"),
            "plain text to TLS",
        ),
    ] {
        let mut p = publisher(&bad).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), p.ping(&stopping)).await;
        let e = r.expect(why).expect_err(why);
        let shown = format!("{e:#} {e:?}");
        assert!(!shown.contains("wrongpass"), "{why}: {shown}");
    }
    let e = publisher("redis://:wrongpass@127.0.0.1:notaport")
        .err()
        .unwrap();
    assert!(!format!("{e:#}").contains("wrongpass"));
}
