//! Datasets in RecBole's atomic-file form.
//!
//! A dataset is a folder holding `NAME.inter` (required) and optionally
//! `NAME.item`, `NAME.kg` and `NAME.link`. Column types come from the
//! `name:type` headers; unknown columns are ignored; malformed rows are errors
//! that name the file and line. Users, items, entities and relations get dense
//! `u32` indexes in order of first appearance, which every other stage uses.

pub mod atomic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use atomic::{AtomicFile, FieldType};

/// Errors while reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid atomic-file content.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The folder does not hold a usable dataset.
    #[error("{dir}: {reason}")]
    Layout {
        /// The dataset folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// A bijection between external string ids and dense `u32` indexes.
#[derive(Debug, Clone, Default)]
pub struct IdMap {
    index: HashMap<String, u32>,
    ids: Vec<String>,
}

impl IdMap {
    /// The index of `id`, inserting it at the end if new.
    pub fn intern(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.index.insert(id.to_string(), i);
        i
    }
    /// The index of `id`, if known.
    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }
    /// The external id of index `i`.
    pub fn id(&self, i: u32) -> &str {
        &self.ids[i as usize]
    }
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// All external ids in index order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }
}

/// One user-item interaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    /// Dense user index.
    pub user: u32,
    /// Dense item index.
    pub item: u32,
    /// The interaction's strength, when the file has one: its `rating`
    /// column, else `weight`, else `play_count` (Last.FM). Not always a
    /// 1–5 rating: a play count is unbounded.
    pub value: Option<f32>,
    /// `timestamp` column (seconds), when the file has one.
    pub ts: Option<f64>,
}

/// One knowledge-graph triple over dense entity and relation indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triple {
    /// Head entity.
    pub head: u32,
    /// Relation.
    pub relation: u32,
    /// Tail entity.
    pub tail: u32,
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Dataset name (the atomic files' stem).
    pub name: String,
    /// The folder it was read from.
    pub dir: PathBuf,
    /// Users, in order of first appearance in `.inter`.
    pub users: IdMap,
    /// Items: those of `.inter`, then those only in `.item`.
    pub items: IdMap,
    /// Interactions in file order.
    pub interactions: Vec<Interaction>,
    /// Whether interaction values are ratings (a `rating` column), rather
    /// than weights or play counts: only ratings define likes (`co_liked`).
    pub rated: bool,
    /// Per item: its text (token_seq and non-id token columns of `.item`,
    /// joined with ". "), empty when it has none.
    pub item_text: Vec<String>,
    /// KG entities (heads and tails of `.kg`, and linked entities).
    pub entities: IdMap,
    /// KG relations.
    pub relations: IdMap,
    /// KG triples.
    pub triples: Vec<Triple>,
    /// Per item: the KG entity it is linked to, if any.
    pub item_entity: Vec<Option<u32>>,
    /// Links in `.link` whose item is in neither `.inter` nor `.item`.
    pub dangling_links: usize,
    /// SHA-256 over the atomic files read (names and bytes), hex, 16 chars.
    pub digest: String,
}

impl Dataset {
    /// Loads the dataset in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let inter_path = find_one(dir, "inter")?.ok_or_else(|| DatasetError::Layout {
            dir: dir.to_path_buf(),
            reason: "no .inter file (a dataset needs at least NAME.inter)".into(),
        })?;
        let name = inter_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dataset")
            .to_string();
        let mut hasher = Sha256::new();
        let mut read = |path: &Path| -> Result<AtomicFile> {
            let bytes = std::fs::read(path).map_err(|source| DatasetError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            hasher.update(
                path.extension()
                    .map(|e| e.as_encoded_bytes())
                    .unwrap_or(b""),
            );
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            let text = String::from_utf8(bytes).map_err(|e| DatasetError::Malformed {
                path: path.to_path_buf(),
                line: 1,
                reason: format!("not UTF-8: {e}"),
            })?;
            AtomicFile::parse(path, &text)
        };

        let inter = read(&inter_path)?;
        let item_file = find_one(dir, "item")?.map(|p| read(&p)).transpose()?;
        let kg_file = find_one(dir, "kg")?.map(|p| read(&p)).transpose()?;
        let link_file = find_one(dir, "link")?.map(|p| read(&p)).transpose()?;
        let digest = hex16(&hasher.finalize());

        let mut users = IdMap::default();
        let mut items = IdMap::default();
        let u_col = inter.require("user_id")?;
        let i_col = inter.require("item_id")?;
        let v_col = ["rating", "weight", "play_count"]
            .iter()
            .find_map(|name| inter.column(name));
        let rated = inter.column("rating").is_some();
        let t_col = inter.column("timestamp");
        let mut interactions = Vec::with_capacity(inter.rows.len());
        for r in 0..inter.rows.len() {
            let user = users.intern(inter.non_empty(r, u_col)?);
            let item = items.intern(inter.non_empty(r, i_col)?);
            let value = v_col
                .map(|c| inter.float(r, c))
                .transpose()?
                .map(|v| v as f32);
            let ts = t_col.map(|c| inter.float(r, c)).transpose()?;
            interactions.push(Interaction {
                user,
                item,
                value,
                ts,
            });
        }

        let mut item_text = Vec::new();
        if let Some(f) = &item_file {
            let id_col = f.require("item_id")?;
            let text_cols: Vec<usize> = f
                .fields
                .iter()
                .enumerate()
                .filter(|(c, fl)| {
                    *c != id_col && matches!(fl.ty, FieldType::Token | FieldType::TokenSeq)
                })
                .map(|(c, _)| c)
                .collect();
            for r in 0..f.rows.len() {
                let item = items.intern(f.non_empty(r, id_col)?) as usize;
                if item_text.len() <= item {
                    item_text.resize(item + 1, String::new());
                }
                let cells = &f.rows[r].1;
                let text: Vec<&str> = text_cols
                    .iter()
                    .map(|&c| cells[c].as_str())
                    .filter(|s| !s.is_empty())
                    .collect();
                item_text[item] = text.join(". ");
            }
        }
        item_text.resize(items.len(), String::new());

        let mut entities = IdMap::default();
        let mut relations = IdMap::default();
        let mut triples = Vec::new();
        if let Some(f) = &kg_file {
            let (h, rel, t) = (
                f.require("head_id")?,
                f.require("relation_id")?,
                f.require("tail_id")?,
            );
            for r in 0..f.rows.len() {
                triples.push(Triple {
                    head: entities.intern(f.non_empty(r, h)?),
                    relation: relations.intern(f.non_empty(r, rel)?),
                    tail: entities.intern(f.non_empty(r, t)?),
                });
            }
        }
        let mut item_entity = vec![None; items.len()];
        let mut dangling_links = 0;
        if let Some(f) = &link_file {
            let (i_col, e_col) = (f.require("item_id")?, f.require("entity_id")?);
            for r in 0..f.rows.len() {
                let entity = entities.intern(f.non_empty(r, e_col)?);
                match items.get(f.non_empty(r, i_col)?) {
                    Some(item) => item_entity[item as usize] = Some(entity),
                    None => dangling_links += 1,
                }
            }
        }
        if dangling_links > 0 {
            tracing::warn!(
                dangling_links,
                "links whose item is in neither .inter nor .item were ignored"
            );
        }
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            users,
            items,
            interactions,
            rated,
            item_text,
            entities,
            relations,
            triples,
            item_entity,
            dangling_links,
            digest,
        })
    }

    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.items.len()
    }

    /// Whether every interaction has a timestamp.
    pub fn has_timestamps(&self) -> bool {
        !self.interactions.is_empty() && self.interactions.iter().all(|i| i.ts.is_some())
    }
}

/// First 16 hex characters of a digest.
pub fn hex16(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The one file in `dir` with extension `ext`; an error if there are several.
fn find_one(dir: &Path, ext: &str) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DatasetError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(DatasetError::Layout {
            dir: dir.to_path_buf(),
            reason: format!(
                "several .{ext} files ({}); keep one dataset per folder",
                found
                    .iter()
                    .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn loads_all_four_files() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "toy.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\textra:token\n\
             u1\ti1\t4\t10\tx\nu2\ti2\t3\t11\ty\nu1\ti2\t5\t12\tz\n",
        );
        write(
            d.path(),
            "toy.item",
            "item_id:token\tmovie_title:token_seq\tclass:token_seq\tyear:float\n\
             i1\tToy Story\tAnimation Comedy\t1995\ni3\tHeat\t\t1995\n",
        );
        write(
            d.path(),
            "toy.kg",
            "head_id:token\trelation_id:token\ttail_id:token\ne1\tfilm.genre\tg1\n",
        );
        write(
            d.path(),
            "toy.link",
            "item_id:token\tentity_id:token\ni1\te1\ni9\te9\n",
        );
        let ds = Dataset::load(d.path()).unwrap();
        assert_eq!(ds.name, "toy");
        assert_eq!(ds.users.len(), 2);
        assert_eq!(ds.items.ids(), ["i1", "i2", "i3"]);
        assert_eq!(ds.interactions[2].value, Some(5.0));
        assert_eq!(ds.interactions[2].ts, Some(12.0));
        assert_eq!(ds.item_text[0], "Toy Story. Animation Comedy");
        assert_eq!(
            ds.item_text[1], "",
            "an item without a row in .item has no text"
        );
        assert_eq!(ds.item_text[2], "Heat", "empty cells are skipped");
        assert_eq!(ds.triples.len(), 1);
        assert_eq!(ds.item_entity[0], ds.entities.get("e1"));
        assert_eq!(ds.dangling_links, 1);
        assert!(ds.has_timestamps());
        assert_eq!(ds.digest.len(), 16);
    }

    #[test]
    fn optional_files_and_columns_may_be_missing() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.inter", "user_id:token\titem_id:token\nu\ti\n");
        let ds = Dataset::load(d.path()).unwrap();
        assert!(!ds.has_timestamps());
        assert!(ds.triples.is_empty());
        assert_eq!(ds.interactions[0].value, None);
    }

    #[test]
    fn play_counts_are_values() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "lastfm.inter",
            "user_id:token\titem_id:token\tplay_count:float\n2\t51\t13883\n2\t52\t11690\n",
        );
        let ds = Dataset::load(d.path()).unwrap();
        assert!(!ds.rated, "play counts are not ratings");
        assert_eq!(ds.interactions[0].value, Some(13883.0));
        assert_eq!(ds.interactions[1].value, Some(11690.0));
        assert!(!ds.has_timestamps());

        // rating first, then weight, then play_count
        write(
            d.path(),
            "lastfm.inter",
            "user_id:token\titem_id:token\tplay_count:float\tweight:float\nu\ti\t7\t0.5\n",
        );
        let ds = Dataset::load(d.path()).unwrap();
        assert_eq!(ds.interactions[0].value, Some(0.5));
        write(
            d.path(),
            "lastfm.inter",
            "user_id:token\titem_id:token\tplay_count:float\tweight:float\trating:float\n\
             u\ti\t7\t0.5\t4\n",
        );
        let ds = Dataset::load(d.path()).unwrap();
        assert_eq!(ds.interactions[0].value, Some(4.0));
    }

    #[test]
    fn errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.inter",
            "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\t\t2\n",
        );
        let msg = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(
            msg.contains("a.inter:3") && msg.contains("item_id"),
            "{msg}"
        );

        write(
            d.path(),
            "a.inter",
            "user_id:token\titem_id:token\ttimestamp:float\nu\ti\tyesterday\n",
        );
        let msg = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(
            msg.contains("a.inter:2") && msg.contains("yesterday"),
            "{msg}"
        );

        write(d.path(), "a.inter", "user:token\titem_id:token\nu\ti\n");
        let msg = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(msg.contains("user_id"), "{msg}");
    }

    #[test]
    fn layout_errors() {
        let d = tempfile::tempdir().unwrap();
        let msg = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(msg.contains("no .inter file"), "{msg}");
        write(d.path(), "a.inter", "user_id:token\titem_id:token\n");
        write(d.path(), "b.inter", "user_id:token\titem_id:token\n");
        let msg = Dataset::load(d.path()).unwrap_err().to_string();
        assert!(msg.contains("several .inter"), "{msg}");
        let msg = Dataset::load(&d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope"), "{msg}");
    }
}
