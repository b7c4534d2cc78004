//! A serving-side reader of thaw's Redis layout: resolve the version, then
//! read under it. Run: `cargo run --example reader -- [USER] [PREFIX]`
//! (REDIS_URL, default redis://127.0.0.1:6379).
//!
//! Data keys carry the model version. `{prefix}:model` names the one to
//! read (`root` = `{prefix}:{version}`); a model swap writes the new
//! version in full, then flips the marker, then lets the old version's keys
//! expire after `redis.old_version_ttl_secs`. So a reader:
//! 1. reads `root` from `{prefix}:model` (one round trip, cacheable for a
//!    request or a few seconds; never longer than the grace period);
//! 2. reads every key of the request under that root, so one response
//!    never mixes versions, even when a swap flips in between.
//!
//! User keys put the user id in braces (`{root}:recs:{alice}`), a Redis
//! Cluster hash tag: both keys of a user live on one node.

/// A user's published state, all from one model version.
#[derive(Debug)]
pub struct UserView {
    /// The version read.
    pub version: String,
    /// Top-K item ids with scores, best first.
    pub recs: Vec<(String, f64)>,
    /// The user's embedding (little-endian f32), if published.
    pub embedding: Option<Vec<f32>>,
}

/// Reads `user`'s list and embedding under the version `prefix:model` names;
/// `None` before any model is published.
pub async fn read_user(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    user: &str,
) -> redis::RedisResult<Option<UserView>> {
    let (version, root): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(format!("{prefix}:model"))
        .arg("version")
        .arg("root")
        .query_async(conn)
        .await?;
    let (Some(version), Some(root)) = (version, root) else {
        return Ok(None);
    };
    // Both keys share the hash tag {user}: one pipeline, one node.
    let (recs, emb): (Vec<(String, f64)>, Option<Vec<u8>>) = redis::pipe()
        .cmd("ZRANGE")
        .arg(format!("{root}:recs:{{{user}}}"))
        .arg(0)
        .arg(-1)
        .arg("REV")
        .arg("WITHSCORES")
        .cmd("HGET")
        .arg(format!("{root}:user:{{{user}}}"))
        .arg("emb")
        .query_async(conn)
        .await?;
    let embedding = emb.map(|b| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    });
    Ok(Some(UserView {
        version,
        recs,
        embedding,
    }))
}

#[allow(dead_code)] // the tests include this file for `read_user` alone
#[tokio::main(flavor = "current_thread")]
async fn main() -> redis::RedisResult<()> {
    let mut args = std::env::args().skip(1);
    let user = args.next().unwrap_or_else(|| "1".into());
    let prefix = args.next().unwrap_or_else(|| "thaw".into());
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let view = if std::env::var_os("REDIS_CLUSTER").is_some() {
        let mut conn = redis::cluster::ClusterClient::new(vec![url])?
            .get_async_connection()
            .await?;
        read_user(&mut conn, &prefix, &user).await?
    } else {
        let mut conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        read_user(&mut conn, &prefix, &user).await?
    };
    match view {
        None => println!("no model published under `{prefix}` yet"),
        Some(v) => {
            println!("model {} — user {user}:", v.version);
            for (rank, (item, score)) in v.recs.iter().enumerate() {
                println!("{:>3}. {item} ({score:.4})", rank + 1);
            }
            if let Some(e) = &v.embedding {
                println!("embedding: {} dims", e.len());
            }
        }
    }
    Ok(())
}
