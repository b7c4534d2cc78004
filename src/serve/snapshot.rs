//! Snapshots: the engine state ([`CoreState`]) with the input offsets it
//! covers, written to a folder (`snapshot.dir`, a persistent volume in
//! Kubernetes) so that a restart loads the latest one and re-reads only the
//! log after it, instead of the whole log up to the committed offsets.
//!
//! A snapshot covers, per input partition, every message before its offset
//! (the next offset to read). It is taken on the core thread after a
//! published batch (a copy of the state: the core goes on at once) and
//! serialised and written on a thread of its own, at most every
//! `snapshot.every_secs`, when the stream goes idle and at shutdown.
//!
//! A snapshot may be ahead of the committed offsets: the core applies a
//! batch before its effects are in Redis and its offsets committed. Such a
//! snapshot would hold events whose effects a crash lost, so a start uses
//! the newest snapshot that the committed offsets cover, of the running
//! model version, that reads back intact (a SHA-256 over the payload);
//! older ones are the fallback, the whole log the last one.
//!
//! File layout: `THAWSNAP`, the format version (u32 LE), the header's
//! length (u32 LE), the header (JSON: [`Header`]), then the state (postcard).
//! Written to a temporary file, synced and renamed, so a crash leaves either
//! the whole snapshot or none.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::SnapshotSettings;
use super::metrics::Metrics;
use super::state::CoreState;

const MAGIC: &[u8; 8] = b"THAWSNAP";
/// The layout of [`CoreState`] in postcard (which carries no schema): bump it with
/// every change to the state's types, and record the new layout digest in
/// `state::tests::the_snapshot_layout_is_the_recorded_one`.
pub(crate) const FORMAT: u32 = 3;
const SUFFIX: &str = ".thawsnap";

/// Per input partition `(topic, partition)`: the next offset to read (every
/// message before it is applied).
pub type Covered = BTreeMap<(String, i32), i64>;

/// What a snapshot says about itself, readable without its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Model version of the state.
    pub version: String,
    /// `(topic, partition, next offset)` covered.
    pub offsets: Vec<(String, i32, i64)>,
    /// When it was taken, ms since the epoch.
    pub created_ms: i64,
    /// Described items and users in the state.
    pub items: usize,
    /// Users in the state.
    pub users: usize,
    /// Payload size, bytes.
    pub payload_bytes: u64,
    /// SHA-256 of the payload, hex.
    pub payload_sha256: String,
    /// SHA-256 of this header's JSON with this field empty, hex: the
    /// offsets are checked too.
    #[serde(default)]
    pub header_sha256: String,
}

impl Header {
    fn digest(&self) -> String {
        let mut h = self.clone();
        h.header_sha256 = String::new();
        hex(&Sha256::digest(serde_json::to_vec(&h).unwrap_or_default()))
    }
}

impl Header {
    /// The offsets as a map.
    pub fn covered(&self) -> Covered {
        self.offsets
            .iter()
            .map(|(t, p, o)| ((t.clone(), *p), *o))
            .collect()
    }

    /// Whether `committed` (the group's committed offsets, per partition)
    /// reaches every offset the snapshot covers: nothing in it is ahead of
    /// what Redis is known to hold.
    pub fn within(&self, committed: &Covered) -> bool {
        self.offsets
            .iter()
            .all(|(t, p, o)| *o <= 0 || committed.get(&(t.clone(), *p)).is_some_and(|&c| c >= *o))
    }
}

/// Writes `state`, covering `covered`, into `dir`; returns the file and its
/// size. Atomic: a temporary file, synced, then renamed.
pub fn write(dir: &Path, state: &CoreState, covered: &Covered) -> Result<(PathBuf, u64)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let payload = postcard::to_stdvec(state).context("serialising the state")?;
    let header = Header {
        version: state.version.clone(),
        offsets: covered
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect(),
        created_ms: crate::ingest::batch::now_ms(),
        items: state.items(),
        users: state.users(),
        payload_bytes: payload.len() as u64,
        payload_sha256: hex(&Sha256::digest(&payload)),
        header_sha256: String::new(),
    };
    let mut header = header;
    header.header_sha256 = header.digest();
    let head = serde_json::to_vec(&header)?;
    // Named by a sequence number one past the newest (not the wall clock,
    // which can step back): the order of the names is the order of writing.
    let seq = list(dir)
        .first()
        .and_then(|p| sequence(p))
        .map_or(1, |n| n + 1);
    let name = format!(
        "snapshot-{seq:013}-{}{SUFFIX}",
        &header.payload_sha256[..12]
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let res = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(MAGIC)?;
        f.write_all(&FORMAT.to_le_bytes())?;
        f.write_all(&(head.len() as u32).to_le_bytes())?;
        f.write_all(&head)?;
        f.write_all(&payload)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself made durable.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    let bytes = (MAGIC.len() + 8 + head.len() + payload.len()) as u64;
    Ok((path, bytes))
}

/// The sequence number in a snapshot's file name.
fn sequence(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("snapshot-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the header of the snapshot at `path`, leaving the file at its
/// payload.
fn open(path: &Path) -> Result<(Header, std::io::BufReader<std::fs::File>)> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = std::io::BufReader::new(f);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("{} is not a thaw snapshot", path.display());
    }
    let mut word = [0u8; 4];
    r.read_exact(&mut word)?;
    let format = u32::from_le_bytes(word);
    if format != FORMAT {
        bail!(
            "{}: snapshot format {format}, this build reads {FORMAT}",
            path.display()
        );
    }
    r.read_exact(&mut word)?;
    let n = u32::from_le_bytes(word) as usize;
    if n > 64 << 20 {
        bail!("{}: header of {n} bytes", path.display());
    }
    let mut head = vec![0u8; n];
    r.read_exact(&mut head)?;
    let header: Header = serde_json::from_slice(&head)
        .with_context(|| format!("{}: reading the header", path.display()))?;
    if header.header_sha256 != header.digest() {
        bail!("{}: the header does not match its digest", path.display());
    }
    Ok((header, r))
}

/// The header of the snapshot at `path`.
pub fn header(path: &Path) -> Result<Header> {
    open(path).map(|(h, _)| h)
}

/// The header and state of the snapshot at `path`, its digest checked.
pub fn read(path: &Path) -> Result<(Header, CoreState)> {
    let (header, mut r) = open(path)?;
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let mut payload = Vec::with_capacity(header.payload_bytes.min(size) as usize);
    r.read_to_end(&mut payload)
        .with_context(|| format!("reading {}", path.display()))?;
    if payload.len() as u64 != header.payload_bytes
        || hex(&Sha256::digest(&payload)) != header.payload_sha256
    {
        bail!(
            "{}: the payload does not match its digest (truncated or corrupt)",
            path.display()
        );
    }
    let state = postcard::from_bytes(&payload)
        .with_context(|| format!("{}: decoding the state", path.display()))?;
    Ok((header, state))
}

/// Renames a snapshot that could not be used to `<name>.bad`, so that later
/// starts do not try it again (kept for inspection).
pub fn set_aside(path: &Path) {
    let mut bad = path.as_os_str().to_owned();
    bad.push(".bad");
    if let Err(e) = std::fs::rename(path, &bad) {
        tracing::warn!(file = %path.display(), error = %e, "could not set the snapshot aside");
    }
}

/// The snapshots in `dir`, newest first (none when it does not exist).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(SUFFIX))
        })
        .collect();
    // Names start with the zero-padded creation time.
    out.sort_unstable_by(|a, b| b.cmp(a));
    out
}

/// Deletes all but the newest `keep` snapshots, and temporary files a crash
/// left behind (when `tmp`).
fn prune(dir: &Path, keep: usize, tmp: bool) {
    for old in list(dir).into_iter().skip(keep) {
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(file = %old.display(), error = %e, "could not delete an old snapshot");
        }
    }
    if tmp {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".snapshot-") && n.ends_with(".tmp"))
            {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// The newest snapshot in `dir` that `committed` covers, of model
/// `version`, read back intact; each one passed over is logged with why.
pub fn latest(
    dir: &Path,
    version: &str,
    committed: &Covered,
) -> Option<(PathBuf, CoreState, Header)> {
    for path in list(dir) {
        let header = match header(&path) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = format!("{e:#}"), "snapshot unreadable, passed over");
                continue;
            }
        };
        if header.version != version {
            tracing::info!(file = %path.display(), snapshot_model = %header.version, model = %version, "snapshot of another model version, passed over");
            continue;
        }
        if !header.within(committed) {
            tracing::info!(file = %path.display(), "snapshot ahead of the committed offsets, passed over");
            continue;
        }
        match read(&path) {
            Ok((h, state)) => return Some((path, state, h)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = format!("{e:#}"), "snapshot unreadable, passed over")
            }
        }
    }
    None
}

/// The core stage's snapshot writer: at most one write in flight, at most
/// one every `every_secs`.
pub struct Snapshots {
    dir: PathBuf,
    every: Duration,
    keep: usize,
    last: Instant,
    /// What the last snapshot covered (nothing new: none taken).
    last_covered: Option<Covered>,
    writing: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Snapshots {
    /// The writer of `s`; `None` when snapshots are off.
    pub fn build(s: &SnapshotSettings, metrics: Arc<Metrics>) -> Option<Self> {
        let dir = s.dir.clone()?;
        if let Err(e) = std::fs::create_dir_all(&dir) {
            // Not fatal: the engine runs, restarts read the whole log.
            tracing::error!(dir = %dir.display(), error = %e, "the snapshot folder cannot be created: no snapshots");
        }
        prune(&dir, s.keep.max(1), true);
        Some(Self {
            dir,
            every: Duration::from_secs(s.every_secs),
            keep: s.keep.max(1),
            last: Instant::now(),
            last_covered: None,
            writing: None,
            metrics,
        })
    }

    /// Whether a snapshot of a state covering `covered` is due: the interval
    /// passed (a tenth of it when the stream went `idle`, so that a quiet
    /// engine's latest snapshot holds everything), no write is in flight,
    /// and something was applied since the last one.
    pub fn due(&mut self, covered: &Covered, idle: bool) -> bool {
        if self.writing.as_ref().is_some_and(|h| !h.is_finished()) {
            return false;
        }
        if let Some(h) = self.writing.take() {
            let _ = h.join();
        }
        let every = if idle { self.every / 10 } else { self.every };
        self.last.elapsed() >= every && self.last_covered.as_ref() != Some(covered)
    }

    /// The next snapshot is due whatever the offsets (the model changed).
    pub fn forget(&mut self) {
        self.last_covered = None;
    }

    /// Writes `state` (covering `covered`) on a thread of its own.
    pub fn start(&mut self, state: CoreState, covered: Covered) {
        self.last = Instant::now();
        self.last_covered = Some(covered.clone());
        let (dir, keep, metrics) = (self.dir.clone(), self.keep, self.metrics.clone());
        let h = std::thread::Builder::new()
            .name("thaw-snapshot".into())
            .spawn(move || write_logged(&dir, keep, &state, &covered, &metrics));
        match h {
            Ok(h) => self.writing = Some(h),
            Err(e) => {
                tracing::error!(error = %e, "could not start the snapshot writer");
                self.metrics.snapshot(None);
            }
        }
    }

    /// At shutdown: waits for the write in flight, then writes `state` now
    /// unless the last snapshot covers the same offsets.
    pub fn finish(&mut self, state: CoreState, covered: Covered) {
        if let Some(h) = self.writing.take() {
            let _ = h.join();
        }
        if self.last_covered.as_ref() == Some(&covered) || covered.is_empty() {
            return;
        }
        write_logged(&self.dir, self.keep, &state, &covered, &self.metrics);
        self.last_covered = Some(covered);
    }
}

fn write_logged(dir: &Path, keep: usize, state: &CoreState, covered: &Covered, metrics: &Metrics) {
    let t0 = Instant::now();
    match write(dir, state, covered) {
        Ok((path, bytes)) => {
            let secs = t0.elapsed().as_secs_f64();
            metrics.snapshot(Some((bytes, secs)));
            tracing::info!(
                file = %path.display(),
                bytes,
                seconds = secs,
                items = state.items(),
                users = state.users(),
                "snapshot written"
            );
            prune(dir, keep, false);
        }
        Err(e) => {
            metrics.snapshot(None);
            tracing::error!(
                error = format!("{e:#}"),
                "snapshot failed (the previous ones are kept)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offsets: &[(&str, i32, i64)]) -> Header {
        Header {
            version: "v".into(),
            offsets: offsets
                .iter()
                .map(|(t, p, o)| (t.to_string(), *p, *o))
                .collect(),
            created_ms: 0,
            items: 0,
            users: 0,
            payload_bytes: 0,
            payload_sha256: String::new(),
            header_sha256: String::new(),
        }
    }

    #[test]
    fn a_snapshot_is_used_only_within_the_committed_offsets() {
        let committed: Covered = [(("items".into(), 0), 10), (("interactions".into(), 1), 5)]
            .into_iter()
            .collect();
        assert!(header(&[("items", 0, 10), ("interactions", 1, 5)]).within(&committed));
        assert!(header(&[("items", 0, 3)]).within(&committed));
        assert!(header(&[]).within(&committed));
        assert!(!header(&[("items", 0, 11)]).within(&committed), "ahead");
        assert!(
            !header(&[("interactions", 0, 1)]).within(&committed),
            "a partition never committed"
        );
    }

    #[test]
    fn old_snapshots_and_leftovers_are_pruned_newest_kept() {
        let dir = tempfile::tempdir().unwrap();
        for t in [3, 1, 2, 10] {
            std::fs::write(
                dir.path().join(format!("snapshot-{t:013}-abc{SUFFIX}")),
                b"x",
            )
            .unwrap();
        }
        std::fs::write(dir.path().join(".snapshot-1-x.thawsnap.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        let names = |d: &Path| -> Vec<String> {
            list(d)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy()[9..22].to_string())
                .collect()
        };
        assert_eq!(
            names(dir.path()),
            [
                "0000000000010",
                "0000000000003",
                "0000000000002",
                "0000000000001"
            ]
        );
        prune(dir.path(), 2, true);
        assert_eq!(names(dir.path()), ["0000000000010", "0000000000003"]);
        assert!(!dir.path().join(".snapshot-1-x.thawsnap.tmp").exists());
        assert!(dir.path().join("other.txt").exists());
        // Not a snapshot: refused with a reason, passed over by `latest`.
        let junk = dir.path().join(format!("snapshot-{:013}-zzz{SUFFIX}", 99));
        std::fs::write(&junk, b"not a snapshot at all").unwrap();
        assert!(read(&junk)
            .unwrap_err()
            .to_string()
            .contains("not a thaw snapshot"));
        assert!(latest(dir.path(), "v", &Covered::new()).is_none());
    }
}
