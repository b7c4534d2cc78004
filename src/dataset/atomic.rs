//! Parsing of RecBole atomic files: a tab-separated header of `name:type`
//! columns, then one row per line.
//!
//! Types are RecBole's: `token`, `token_seq` (space-separated tokens),
//! `float`, `float_seq`. A malformed row is an error naming the file and the
//! line, never a silent skip: a dataset that loses rows without saying so gives
//! numbers nobody can trust.

use std::path::{Path, PathBuf};

use super::{DatasetError, Result};

/// The type of one column, from its `name:type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// One opaque token (an id, a category).
    Token,
    /// Space-separated tokens (a title, a list of classes).
    TokenSeq,
    /// A number.
    Float,
    /// Space-separated numbers.
    FloatSeq,
}

impl FieldType {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "token" => Some(Self::Token),
            "token_seq" => Some(Self::TokenSeq),
            "float" => Some(Self::Float),
            "float_seq" => Some(Self::FloatSeq),
            _ => None,
        }
    }
}

/// One column of an atomic file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Column name without the type suffix, e.g. `item_id`.
    pub name: String,
    /// Column type.
    pub ty: FieldType,
}

/// A parsed atomic file: its columns and its rows as raw strings.
///
/// Values stay strings here; [`AtomicFile::float`] parses a float cell with an
/// error that names the file, line and column.
#[derive(Debug, Clone)]
pub struct AtomicFile {
    /// Where the file was read from (for error messages).
    pub path: PathBuf,
    /// The columns, in file order.
    pub fields: Vec<Field>,
    /// Rows with their 1-based line numbers; each row has `fields.len()` cells.
    pub rows: Vec<(usize, Vec<String>)>,
}

impl AtomicFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as the content of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut lines = text.lines().enumerate();
        let header = loop {
            match lines.next() {
                Some((_, l)) if l.trim().is_empty() => continue,
                Some((_, l)) => break l,
                None => {
                    return Err(DatasetError::Malformed {
                        path: path.to_path_buf(),
                        line: 1,
                        reason: "empty file: expected a `name:type` header".into(),
                    })
                }
            }
        };
        let mut fields = Vec::new();
        for col in header.split('\t') {
            let col = col.trim().trim_start_matches('\u{feff}');
            let (name, ty) = col
                .rsplit_once(':')
                .ok_or_else(|| DatasetError::Malformed {
                    path: path.to_path_buf(),
                    line: 1,
                    reason: format!("header column `{col}` is not of the form name:type"),
                })?;
            let ty = FieldType::parse(ty).ok_or_else(|| DatasetError::Malformed {
                path: path.to_path_buf(),
                line: 1,
                reason: format!(
                    "header column `{col}` has unknown type `{ty}` (token, token_seq, float, float_seq)"
                ),
            })?;
            fields.push(Field {
                name: name.to_string(),
                ty,
            });
        }
        let mut rows = Vec::new();
        for (i, line) in lines {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let cells: Vec<String> = line.split('\t').map(|c| c.trim().to_string()).collect();
            if cells.len() != fields.len() {
                return Err(DatasetError::Malformed {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: format!(
                        "expected {} tab-separated columns, found {}",
                        fields.len(),
                        cells.len()
                    ),
                });
            }
            rows.push((i + 1, cells));
        }
        Ok(Self {
            path: path.to_path_buf(),
            fields,
            rows,
        })
    }

    /// Index of the column named `name`, if present.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// Index of the column named `name`, or an error saying the file lacks it.
    pub fn require(&self, name: &str) -> Result<usize> {
        self.column(name).ok_or_else(|| DatasetError::Malformed {
            path: self.path.clone(),
            line: 1,
            reason: format!(
                "missing required column `{name}` (found: {})",
                self.fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// Parses the float in row `row` (an index into `rows`), column `col`.
    pub fn float(&self, row: usize, col: usize) -> Result<f64> {
        let (line, cells) = &self.rows[row];
        let cell = &cells[col];
        cell.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| DatasetError::Malformed {
                path: self.path.clone(),
                line: *line,
                reason: format!(
                    "column `{}`: `{cell}` is not a finite number",
                    self.fields[col].name
                ),
            })
    }

    /// Returns an error for row `row` if cell `col` is empty.
    pub fn non_empty(&self, row: usize, col: usize) -> Result<&str> {
        let (line, cells) = &self.rows[row];
        let cell = cells[col].as_str();
        if cell.is_empty() {
            return Err(DatasetError::Malformed {
                path: self.path.clone(),
                line: *line,
                reason: format!("column `{}` is empty", self.fields[col].name),
            });
        }
        Ok(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AtomicFile> {
        AtomicFile::parse(Path::new("x.inter"), text)
    }

    #[test]
    fn parses_header_and_rows() {
        let f =
            parse("user_id:token\titem_id:token\trating:float\n1\t2\t3.5\n\n4\t5\t1\n").unwrap();
        assert_eq!(f.fields.len(), 3);
        assert_eq!(f.fields[2].ty, FieldType::Float);
        assert_eq!(f.rows.len(), 2);
        assert_eq!(
            f.rows[1].0, 4,
            "line numbers are 1-based and count blank lines"
        );
        assert_eq!(f.float(0, 2).unwrap(), 3.5);
    }

    #[test]
    fn wrong_column_count_names_file_and_line() {
        let err = parse("user_id:token\titem_id:token\n1\t2\n3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.inter:3"), "{msg}");
        assert!(msg.contains("expected 2"), "{msg}");
    }

    #[test]
    fn bad_float_names_column() {
        let f = parse("user_id:token\trating:float\n1\tabc\n").unwrap();
        let msg = f.float(0, 1).unwrap_err().to_string();
        assert!(
            msg.contains("x.inter:2") && msg.contains("rating") && msg.contains("abc"),
            "{msg}"
        );
        let f = parse("user_id:token\trating:float\n1\tNaN\n").unwrap();
        assert!(f.float(0, 1).is_err(), "NaN is not a usable rating");
    }

    #[test]
    fn bad_header_is_an_error() {
        assert!(parse("user_id\titem_id:token\n")
            .unwrap_err()
            .to_string()
            .contains("name:type"));
        assert!(parse("user_id:int\n")
            .unwrap_err()
            .to_string()
            .contains("unknown type"));
        assert!(parse("").unwrap_err().to_string().contains("empty file"));
    }

    #[test]
    fn missing_required_column_lists_found_ones() {
        let f = parse("user_id:token\tfoo:float\n").unwrap();
        let msg = f.require("item_id").unwrap_err().to_string();
        assert!(
            msg.contains("item_id") && msg.contains("user_id, foo"),
            "{msg}"
        );
    }
}
