//! The cold-start protocol (MetaKG §7.1, as fixed in `DESIGN.md`) and its
//! files.
//!
//! Users are ordered by their first interaction and items likewise (by a seeded
//! random order when the dataset has no timestamps); the last `new_frac` of each
//! are *new*. Existing users minus a held-out `warm_frac` give the
//! meta-training data (their interactions with existing items). Scenarios:
//! `warm` (held-out existing users × existing items), `uc` (new users ×
//! existing items), `ic` (existing users × new items), `uic` (new users × new
//! items). A user enters a scenario with at least `min_items` items there;
//! `query` of them, drawn at random, are hidden and the rest is the support set.
//!
//! Files are MetaKG's: `meta_training.txt` and `{scenario}_{support,query}.txt`,
//! one line per user, `user item item ...`, with the same protocol rebuilt inside
//! the meta-training data alone under `valid/` for choosing hyper-parameters.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::{hex16, Dataset, Interaction};

/// Errors reading or writing split folders.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line names a user or item the dataset does not have, or is malformed.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The folder lacks a required file or is inconsistent.
    #[error("{dir}: {reason}")]
    Layout {
        /// The split folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The protocol's settings are out of range.
    #[error("invalid split settings: {0}")]
    Config(String),
}

/// Result alias for this module.
pub type Result<T, E = SplitError> = std::result::Result<T, E>;

/// The four evaluation scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Held-out existing users, existing items (the non-cold-start scenario).
    Warm,
    /// User cold start: new users, existing items.
    Uc,
    /// Item cold start: existing users, new items.
    Ic,
    /// User-item cold start: new users, new items.
    Uic,
}

impl Scenario {
    /// All scenarios in report order.
    pub const ALL: [Scenario; 4] = [Scenario::Warm, Scenario::Uc, Scenario::Ic, Scenario::Uic];

    /// The file-name prefix and JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Warm => "warm",
            Scenario::Uc => "uc",
            Scenario::Ic => "ic",
            Scenario::Uic => "uic",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One user's task in a scenario: the support set it may learn from and the
/// hidden query set it is scored on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Dense user index.
    pub user: u32,
    /// Support items (dense indexes).
    pub support: Vec<u32>,
    /// Query items (dense indexes).
    pub query: Vec<u32>,
}

/// A split over a dataset's dense indexes.
#[derive(Debug, Clone)]
pub struct Split {
    /// Meta-training interactions: user and their items.
    pub meta_training: Vec<(u32, Vec<u32>)>,
    /// Tasks per scenario; a scenario absent from the folder is absent here.
    pub scenarios: BTreeMap<Scenario, Vec<Task>>,
    /// The protocol rebuilt inside meta-training data, for hyper-parameters.
    pub valid: Option<Box<Split>>,
    /// SHA-256 over the split's files (names and bytes), 16 hex chars; empty
    /// for a split built in memory and not yet written.
    pub digest: String,
}

/// Settings of the protocol (`thaw split`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Fraction of users and of items that are new (the last ones to appear).
    /// 0.2 as in MetaKG.
    pub new_frac: f64,
    /// Fraction of existing users held out as the warm scenario. 0.1 as in DESIGN.md.
    pub warm_frac: f64,
    /// Least items a user needs in a scenario to be a task there. 13 = 10 query
    /// items plus at least 3 for support, as in MetaKG.
    pub min_items: usize,
    /// Query-set size. 10 as in MetaKG.
    pub query: usize,
    /// Seed of every random choice (warm users, query sets, order without timestamps).
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            new_frac: 0.2,
            warm_frac: 0.1,
            min_items: 13,
            query: 10,
            seed: 2020,
        }
    }
}

impl SplitConfig {
    fn validate(&self) -> Result<()> {
        if !(self.new_frac > 0.0 && self.new_frac < 1.0) {
            return Err(SplitError::Config(format!(
                "new_frac {} not in (0, 1)",
                self.new_frac
            )));
        }
        if !(0.0..1.0).contains(&self.warm_frac) {
            return Err(SplitError::Config(format!(
                "warm_frac {} not in [0, 1)",
                self.warm_frac
            )));
        }
        if self.query == 0 || self.min_items <= self.query {
            return Err(SplitError::Config(format!(
                "need 0 < query ({}) < min_items ({}) so every task keeps a support set",
                self.query, self.min_items
            )));
        }
        Ok(())
    }
}

/// Counts that describe a built split, for logs and the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitStats {
    /// Users with interactions.
    pub users: usize,
    /// Items with interactions.
    pub items: usize,
    /// New users.
    pub new_users: usize,
    /// New items.
    pub new_items: usize,
    /// Users in meta-training.
    pub meta_training_users: usize,
    /// Tasks per scenario.
    pub tasks: BTreeMap<String, usize>,
}

/// Builds the protocol over `interactions` (dense indexes of one dataset).
///
/// With `with_valid`, the same protocol is rebuilt inside the meta-training
/// interactions (seed + 1) and attached as [`Split::valid`].
pub fn build(
    interactions: &[Interaction],
    cfg: &SplitConfig,
    with_valid: bool,
) -> Result<(Split, SplitStats)> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let timed = !interactions.is_empty() && interactions.iter().all(|i| i.ts.is_some());

    // Order of arrival: by first timestamp, ties by first appearance; without
    // timestamps, a seeded random order.
    let users = arrival_order(interactions.iter().map(|i| (i.user, i.ts)), timed, &mut rng);
    let items = arrival_order(interactions.iter().map(|i| (i.item, i.ts)), timed, &mut rng);
    let n_old_users = old_count(users.len(), cfg.new_frac);
    let n_old_items = old_count(items.len(), cfg.new_frac);
    let new_user: HashSet<u32> = users[n_old_users..].iter().copied().collect();
    let new_item: HashSet<u32> = items[n_old_items..].iter().copied().collect();

    let mut old_users: Vec<u32> = users[..n_old_users].to_vec();
    old_users.shuffle(&mut rng);
    let n_warm = (old_users.len() as f64 * cfg.warm_frac).floor() as usize;
    let warm: HashSet<u32> = old_users[..n_warm].iter().copied().collect();

    // Each user's distinct items, sorted, per (user is new, item is new).
    let mut by_user: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for i in interactions {
        by_user.entry(i.user).or_default().push(i.item);
    }
    let mut meta_training = Vec::new();
    let mut scenarios: BTreeMap<Scenario, Vec<Task>> =
        Scenario::ALL.iter().map(|&s| (s, Vec::new())).collect();
    for &u in &users {
        let mut its = by_user.remove(&u).unwrap_or_default();
        its.sort_unstable();
        its.dedup();
        let (new_its, old_its): (Vec<u32>, Vec<u32>) =
            its.into_iter().partition(|i| new_item.contains(i));
        let user_new = new_user.contains(&u);
        let (old_scenario, new_scenario) = if user_new {
            (Some(Scenario::Uc), Scenario::Uic)
        } else if warm.contains(&u) {
            (Some(Scenario::Warm), Scenario::Ic)
        } else {
            if !old_its.is_empty() {
                meta_training.push((u, old_its.clone()));
            }
            (None, Scenario::Ic)
        };
        for (scenario, its) in [(old_scenario, old_its), (Some(new_scenario), new_its)] {
            if let Some(s) = scenario {
                if its.len() >= cfg.min_items {
                    let task = draw_task(u, its, cfg.query, &mut rng);
                    scenarios
                        .get_mut(&s)
                        .expect("all scenarios present")
                        .push(task);
                }
            }
        }
    }

    let stats = SplitStats {
        users: users.len(),
        items: items.len(),
        new_users: users.len() - n_old_users,
        new_items: items.len() - n_old_items,
        meta_training_users: meta_training.len(),
        tasks: scenarios
            .iter()
            .map(|(s, t)| (s.name().to_string(), t.len()))
            .collect(),
    };
    let valid = if with_valid {
        let inner: Vec<Interaction> = {
            let mt: BTreeMap<u32, HashSet<u32>> = meta_training
                .iter()
                .map(|(u, its)| (*u, its.iter().copied().collect()))
                .collect();
            interactions
                .iter()
                .filter(|i| mt.get(&i.user).is_some_and(|s| s.contains(&i.item)))
                .copied()
                .collect()
        };
        let cfg = SplitConfig {
            seed: cfg.seed.wrapping_add(1),
            ..cfg.clone()
        };
        Some(Box::new(build(&inner, &cfg, false)?.0))
    } else {
        None
    };
    Ok((
        Split {
            meta_training,
            scenarios,
            valid,
            digest: String::new(),
        },
        stats,
    ))
}

/// `floor(n * (1 - new_frac))`, the count of existing users or items.
fn old_count(n: usize, new_frac: f64) -> usize {
    ((n as f64) * (1.0 - new_frac) + 1e-9).floor() as usize
}

fn arrival_order(
    events: impl Iterator<Item = (u32, Option<f64>)>,
    timed: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<u32> {
    // first[i] = (first timestamp, position of first appearance)
    let mut first: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
    for (pos, (id, ts)) in events.enumerate() {
        let ts = ts.unwrap_or(0.0);
        first
            .entry(id)
            .and_modify(|e| {
                if ts < e.0 {
                    e.0 = ts
                }
            })
            .or_insert((ts, pos));
    }
    let mut ids: Vec<(u32, (f64, usize))> = first.into_iter().collect();
    if timed {
        ids.sort_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then(a.1 .1.cmp(&b.1 .1)));
        ids.into_iter().map(|(id, _)| id).collect()
    } else {
        let mut ids: Vec<u32> = ids.into_iter().map(|(id, _)| id).collect();
        ids.shuffle(rng);
        ids
    }
}

fn draw_task(user: u32, mut items: Vec<u32>, query: usize, rng: &mut ChaCha8Rng) -> Task {
    items.shuffle(rng);
    let mut q = items.split_off(items.len() - query);
    items.sort_unstable();
    q.sort_unstable();
    Task {
        user,
        support: items,
        query: q,
    }
}

const META: &str = "meta_training.txt";

impl Split {
    /// Writes the split (and `valid/`) to `dir` in MetaKG's format, with the
    /// dataset's external ids, and sets [`Split::digest`].
    pub fn write(&mut self, dir: &Path, ds: &Dataset) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SplitError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let line = |u: u32, its: &[u32]| {
            let mut s = ds.users.id(u).to_string();
            for &i in its {
                s.push(' ');
                s.push_str(ds.items.id(i));
            }
            s.push('\n');
            s
        };
        let mut files: Vec<(String, String)> = vec![(
            META.into(),
            self.meta_training
                .iter()
                .map(|(u, its)| line(*u, its))
                .collect(),
        )];
        for (s, tasks) in &self.scenarios {
            files.push((
                format!("{s}_support.txt"),
                tasks.iter().map(|t| line(t.user, &t.support)).collect(),
            ));
            files.push((
                format!("{s}_query.txt"),
                tasks.iter().map(|t| line(t.user, &t.query)).collect(),
            ));
        }
        for (name, text) in &files {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io(&p))?;
        }
        if let Some(v) = &mut self.valid {
            v.write(&dir.join("valid"), ds)?;
        }
        self.digest = digest_dir(dir)?;
        Ok(())
    }

    /// Reads a split folder written by `thaw split` or by others in MetaKG's
    /// format, resolving ids against `ds`. `meta_training.txt` is required; each
    /// scenario needs both its support and query file or neither; `valid/` is
    /// read when present.
    pub fn read(dir: &Path, ds: &Dataset) -> Result<Self> {
        let meta = dir.join(META);
        if !meta.is_file() {
            return Err(SplitError::Layout {
                dir: dir.to_path_buf(),
                reason: format!("no {META}: not a split folder"),
            });
        }
        let meta_training = read_lines(&meta, ds)?;
        let mut scenarios = BTreeMap::new();
        for s in Scenario::ALL {
            let sp = dir.join(format!("{s}_support.txt"));
            let qp = dir.join(format!("{s}_query.txt"));
            match (sp.is_file(), qp.is_file()) {
                (false, false) => continue,
                (true, true) => {}
                _ => {
                    return Err(SplitError::Layout {
                        dir: dir.to_path_buf(),
                        reason: format!(
                            "scenario {s} needs both {s}_support.txt and {s}_query.txt"
                        ),
                    })
                }
            }
            let support: BTreeMap<u32, Vec<u32>> = read_lines(&sp, ds)?.into_iter().collect();
            let mut tasks = Vec::new();
            for (user, query) in read_lines(&qp, ds)? {
                if query.is_empty() {
                    continue;
                }
                tasks.push(Task {
                    user,
                    support: support.get(&user).cloned().unwrap_or_default(),
                    query,
                });
            }
            scenarios.insert(s, tasks);
        }
        let valid_dir = dir.join("valid");
        let valid = if valid_dir.join(META).is_file() {
            Some(Box::new(Split::read(&valid_dir, ds)?))
        } else {
            None
        };
        Ok(Self {
            meta_training,
            scenarios,
            valid,
            digest: digest_dir(dir)?,
        })
    }
}

fn read_lines(path: &Path, ds: &Dataset) -> Result<Vec<(u32, Vec<u32>)>> {
    let text = std::fs::read_to_string(path).map_err(|source| SplitError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let mut toks = line.split_whitespace();
        let Some(u) = toks.next() else { continue };
        let err = |reason: String| SplitError::Malformed {
            path: path.to_path_buf(),
            line: n + 1,
            reason,
        };
        let user = ds
            .users
            .get(u)
            .ok_or_else(|| err(format!("user `{u}` is not in dataset {}", ds.name)))?;
        if !seen.insert(user) {
            return Err(err(format!("user `{u}` has a second line")));
        }
        let mut items = Vec::new();
        for t in toks {
            items.push(
                ds.items
                    .get(t)
                    .ok_or_else(|| err(format!("item `{t}` is not in dataset {}", ds.name)))?,
            );
        }
        items.sort_unstable();
        items.dedup();
        out.push((user, items));
    }
    Ok(out)
}

/// SHA-256 over the split files in `dir` and `dir/valid` (sorted names and bytes).
fn digest_dir(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for sub in ["", "valid"] {
        let d = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
            .filter(|p| p.file_name().is_none_or(|n| n != "README.txt"))
            .collect();
        names.sort();
        for p in names {
            let bytes = std::fs::read(&p).map_err(|source| SplitError::Io {
                path: p.clone(),
                source,
            })?;
            h.update(sub.as_bytes());
            h.update(p.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
    }
    Ok(hex16(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// A random timed dataset: `n_users` users arriving over time, each with a
    /// random number of items among `n_items` (which arrive over time too).
    fn synthetic(n_users: u32, n_items: u32, seed: u64) -> Vec<Interaction> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for u in 0..n_users {
            let n = rng.random_range(5..60);
            for _ in 0..n {
                let item = rng.random_range(0..n_items);
                let ts = (u as f64).max(item as f64) * 10.0 + rng.random_range(0.0..5.0);
                out.push(Interaction {
                    user: u,
                    item,
                    value: None,
                    ts: Some(ts),
                });
            }
        }
        out
    }

    fn check_invariants(split: &Split, inter: &[Interaction], cfg: &SplitConfig) {
        let mt_users: HashSet<u32> = split.meta_training.iter().map(|(u, _)| *u).collect();
        let mt_items: HashSet<u32> = split
            .meta_training
            .iter()
            .flat_map(|(_, its)| its.iter().copied())
            .collect();
        let user_items: BTreeMap<u32, HashSet<u32>> =
            inter.iter().fold(BTreeMap::new(), |mut m, i| {
                m.entry(i.user).or_insert_with(HashSet::new).insert(i.item);
                m
            });
        for (s, tasks) in &split.scenarios {
            for t in tasks {
                let sup: HashSet<u32> = t.support.iter().copied().collect();
                assert_eq!(t.query.len(), cfg.query);
                assert!(t.support.len() + t.query.len() >= cfg.min_items);
                assert!(
                    t.query.iter().all(|q| !sup.contains(q)),
                    "support and query disjoint"
                );
                // no query item in the user's training data
                if let Some((_, its)) = split.meta_training.iter().find(|(u, _)| *u == t.user) {
                    assert!(
                        t.query.iter().all(|q| !its.contains(q)),
                        "query item in training"
                    );
                }
                assert!(t.query.iter().all(|q| user_items[&t.user].contains(q)));
                match s {
                    Scenario::Warm => assert!(!mt_users.contains(&t.user), "warm user in mt"),
                    Scenario::Uc | Scenario::Uic => assert!(!mt_users.contains(&t.user)),
                    Scenario::Ic => {}
                }
                if matches!(s, Scenario::Ic | Scenario::Uic) {
                    assert!(
                        t.query
                            .iter()
                            .chain(&t.support)
                            .all(|i| !mt_items.contains(i)),
                        "new items never in meta-training"
                    );
                }
            }
        }
    }

    /// Items of the existing-item scenarios and of the new-item scenarios never overlap.
    fn check_item_partition(split: &Split) {
        let items = |ss: &[Scenario]| -> HashSet<u32> {
            ss.iter()
                .flat_map(|s| split.scenarios[s].iter())
                .flat_map(|t| t.support.iter().chain(&t.query).copied())
                .collect()
        };
        let old = items(&[Scenario::Warm, Scenario::Uc]);
        let new = items(&[Scenario::Ic, Scenario::Uic]);
        assert!(old.is_disjoint(&new));
        assert!(!old.is_empty() && !new.is_empty());
    }

    #[test]
    fn protocol_invariants_hold() {
        let inter = synthetic(400, 300, 7);
        let cfg = SplitConfig {
            min_items: 8,
            query: 5,
            ..Default::default()
        };
        let (split, stats) = build(&inter, &cfg, true).unwrap();
        assert_eq!(stats.new_users, 400 - 320);
        assert!(stats.tasks.values().all(|&n| n > 0), "{stats:?}");
        check_invariants(&split, &inter, &cfg);
        check_item_partition(&split);
        let valid = split.valid.as_ref().unwrap();
        // valid is built inside meta-training data only
        let mt: HashSet<(u32, u32)> = split
            .meta_training
            .iter()
            .flat_map(|(u, its)| its.iter().map(move |i| (*u, *i)))
            .collect();
        for tasks in valid.scenarios.values() {
            for t in tasks {
                assert!(t.query.iter().all(|i| mt.contains(&(t.user, *i))));
            }
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let inter = synthetic(300, 200, 3);
        let cfg = SplitConfig::default();
        let a = build(&inter, &cfg, true).unwrap().0;
        let b = build(&inter, &cfg, true).unwrap().0;
        assert_eq!(a.scenarios, b.scenarios);
        assert_eq!(a.meta_training, b.meta_training);
        let c = build(&inter, &SplitConfig { seed: 9, ..cfg }, true)
            .unwrap()
            .0;
        assert_ne!(a.scenarios, c.scenarios);
    }

    #[test]
    fn untimed_datasets_use_a_seeded_order() {
        let mut inter = synthetic(300, 200, 5);
        for i in &mut inter {
            i.ts = None;
        }
        let cfg = SplitConfig {
            min_items: 6,
            query: 3,
            ..Default::default()
        };
        let (a, stats) = build(&inter, &cfg, false).unwrap();
        assert_eq!(stats.new_items, 200 - 160);
        check_invariants(&a, &inter, &cfg);
        let b = build(&inter, &cfg, false).unwrap().0;
        assert_eq!(a.scenarios, b.scenarios);
    }

    #[test]
    fn rejects_bad_settings() {
        let bad = [
            SplitConfig {
                new_frac: 0.0,
                ..Default::default()
            },
            SplitConfig {
                query: 13,
                ..Default::default()
            },
            SplitConfig {
                query: 0,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(build(&[], &cfg, false).is_err());
        }
    }

    #[test]
    fn old_count_is_floor() {
        assert_eq!(old_count(943, 0.2), 754);
        assert_eq!(old_count(1682, 0.2), 1345);
        assert_eq!(old_count(10, 0.2), 8);
    }
}
