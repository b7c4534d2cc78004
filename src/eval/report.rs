//! Evaluation reports: the JSON contract other tools read, a Markdown summary,
//! and comparisons of several reports (one table and one SVG chart per mode;
//! the blind and aware modes are never mixed in one table).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::ScenarioMetrics;
use super::split::Scenario;
use super::{EvalError, Mode, Result};

/// One evaluation's results. The JSON shape is a contract:
/// `{"model","mode","k","dataset","split","seconds","scenarios":{name:{users,recall,ndcg,mrr,ci95}}}`
/// plus `params` (the hyper-parameters the model ended with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// `blind` or `aware`.
    pub mode: Mode,
    /// Cut-off K.
    pub k: usize,
    /// Dataset digest.
    pub dataset: String,
    /// Split digest.
    pub split: String,
    /// Wall time of fitting and scoring, seconds.
    pub seconds: f64,
    /// Per scenario (`warm`, `uc`, `ic`, `uic`).
    pub scenarios: BTreeMap<String, ScenarioMetrics>,
    /// Chosen hyper-parameters.
    #[serde(default)]
    pub params: serde_json::Value,
}

fn scenario_order(name: &str) -> usize {
    Scenario::ALL
        .iter()
        .position(|s| s.name() == name)
        .unwrap_or(usize::MAX)
}

fn ordered(r: &Report) -> Vec<(&String, &ScenarioMetrics)> {
    let mut v: Vec<_> = r.scenarios.iter().collect();
    v.sort_by_key(|(n, _)| scenario_order(n));
    v
}

impl Report {
    /// A Markdown summary: one row per scenario.
    pub fn markdown(&self) -> String {
        let k = self.k;
        let mut s = format!(
            "### {} ({} mode), K = {k}\n\ndataset `{}` · split `{}` · {:.2} s\n\n\
             | scenario | users | Recall@{k} | NDCG@{k} | MRR |\n|---|---:|---|---|---|\n",
            self.model,
            self.mode.name(),
            self.dataset,
            self.split,
            self.seconds
        );
        for (name, m) in ordered(self) {
            let cell = |v: f64, ci: [f64; 2]| format!("{v:.4} [{:.4}, {:.4}]", ci[0], ci[1]);
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} |",
                m.users,
                cell(m.recall, m.ci95.recall),
                cell(m.ndcg, m.ci95.ndcg),
                cell(m.mrr, m.ci95.mrr)
            );
        }
        s
    }

    /// Writes the JSON to `path` and the Markdown summary beside it (`.md`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| EvalError::Report {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        write_file(path, &json)?;
        write_file(&path.with_extension("md"), &self.markdown())
    }

    /// Reads a report written by [`Report::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| EvalError::Report {
            path: path.to_path_buf(),
            reason: format!("not a thaw eval report: {e}"),
        })
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The result of comparing reports.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Markdown: one table per mode.
    pub markdown: String,
    /// SVG charts, one per mode.
    pub charts: Vec<(Mode, String)>,
}

/// Compares reports: groups them by mode, checks that each group was measured
/// on the same dataset, split and K, and builds one table and one chart per mode.
pub fn compare(reports: &[(PathBuf, Report)]) -> Result<Comparison> {
    let mut by_mode: BTreeMap<Mode, Vec<&(PathBuf, Report)>> = BTreeMap::new();
    for r in reports {
        by_mode.entry(r.1.mode).or_default().push(r);
    }
    let mut markdown = String::new();
    let mut charts = Vec::new();
    for (mode, group) in by_mode {
        let (p0, first) = group[0];
        for (p, r) in &group[1..] {
            for (what, a, b) in [
                ("dataset", &first.dataset, &r.dataset),
                ("split", &first.split, &r.split),
            ] {
                if a != b {
                    return Err(EvalError::Report {
                        path: p.clone(),
                        reason: format!(
                            "{what} digest {b} differs from {a} of {}: results on different data cannot share a table",
                            p0.display()
                        ),
                    });
                }
            }
            if r.k != first.k {
                return Err(EvalError::Report {
                    path: p.clone(),
                    reason: format!(
                        "K = {} differs from K = {} of {}",
                        r.k,
                        first.k,
                        p0.display()
                    ),
                });
            }
        }
        let reports: Vec<&Report> = group.iter().map(|(_, r)| r).collect();
        markdown.push_str(&table(mode, &reports));
        markdown.push('\n');
        charts.push((mode, chart(mode, &reports)));
    }
    Ok(Comparison { markdown, charts })
}

fn scenario_names(reports: &[&Report]) -> Vec<String> {
    let mut names: Vec<String> = reports
        .iter()
        .flat_map(|r| r.scenarios.keys().cloned())
        .collect();
    names.sort_by_key(|n| (scenario_order(n), n.clone()));
    names.dedup();
    names
}

type Metric = (&'static str, fn(&ScenarioMetrics) -> f64);

/// A chart panel: its title and how to read a value and interval.
type Panel = (String, fn(&ScenarioMetrics) -> (f64, [f64; 2]));

fn table(mode: Mode, reports: &[&Report]) -> String {
    let k = reports[0].k;
    let names = scenario_names(reports);
    let metrics: [Metric; 3] = [("R@", |m| m.recall), ("N@", |m| m.ndcg), ("MRR", |m| m.mrr)];
    let label = |m: &str| {
        if m == "MRR" {
            m.to_string()
        } else {
            format!("{m}{k}")
        }
    };
    let mut s = format!(
        "### {} mode (dataset `{}`, split `{}`)\n\n| model |",
        mode.name(),
        reports[0].dataset,
        reports[0].split
    );
    for n in &names {
        let users = reports
            .iter()
            .find_map(|r| r.scenarios.get(n).map(|m| m.users))
            .unwrap_or(0);
        for (m, _) in &metrics {
            let _ = write!(s, " {n} {} (n={users}) |", label(m));
        }
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(names.len() * metrics.len()));
    s.push('\n');
    for r in reports {
        let _ = write!(s, "| {} |", r.model);
        for n in &names {
            for (_, f) in &metrics {
                match r.scenarios.get(n) {
                    None => s.push_str(" – |"),
                    Some(m) => {
                        let v = f(m);
                        let best = reports
                            .iter()
                            .filter_map(|o| o.scenarios.get(n).map(f))
                            .fold(f64::NEG_INFINITY, f64::max);
                        if v >= best - 1e-12 {
                            let _ = write!(s, " **{v:.4}** |");
                        } else {
                            let _ = write!(s, " {v:.4} |");
                        }
                    }
                }
            }
        }
        s.push('\n');
    }
    s
}

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

/// A grouped bar chart: two panels (Recall@K, NDCG@K), a group of bars per
/// scenario, one bar per model, with 95% interval whiskers.
fn chart(mode: Mode, reports: &[&Report]) -> String {
    let names = scenario_names(reports);
    let k = reports[0].k;
    let (panel_w, panel_h, top, left, gap) = (560.0, 300.0, 60.0, 60.0, 70.0);
    let width = left + 2.0 * panel_w + gap + 20.0;
    let legend_h = 24.0 * reports.len().div_ceil(6) as f64;
    let height = top + panel_h + 50.0 + legend_h;
    let panels: [Panel; 2] = [
        (format!("Recall@{k}"), |m| (m.recall, m.ci95.recall)),
        (format!("NDCG@{k}"), |m| (m.ndcg, m.ci95.ndcg)),
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"16\" font-weight=\"bold\">thaw eval: {} mode \
         (95% bootstrap intervals over users)</text>\n",
        mode.name()
    );
    for (p, (title, get)) in panels.iter().enumerate() {
        let x0 = left + p as f64 * (panel_w + gap);
        let ymax = reports
            .iter()
            .flat_map(|r| r.scenarios.values().map(|m| get(m).1[1]))
            .fold(0.0f64, f64::max)
            .max(0.01);
        let ymax = nice_ceiling(ymax);
        let y = |v: f64| top + panel_h - (v / ymax) * panel_h;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{title}</text>",
            x0,
            top - 10.0
        );
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            let _ = writeln!(
                s,
                "<line x1=\"{x0}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
                x0 + panel_w,
                x0 - 6.0,
                y(v) + 4.0,
                yy = y(v)
            );
        }
        let group_w = panel_w / names.len().max(1) as f64;
        let bar_w = (group_w * 0.8) / reports.len() as f64;
        for (g, n) in names.iter().enumerate() {
            let gx = x0 + g as f64 * group_w + group_w * 0.1;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
                gx + group_w * 0.4,
                top + panel_h + 18.0
            );
            for (b, r) in reports.iter().enumerate() {
                let Some(m) = r.scenarios.get(n) else {
                    continue;
                };
                let (v, ci) = get(m);
                let bx = gx + b as f64 * bar_w;
                let color = PALETTE[b % PALETTE.len()];
                let _ = writeln!(
                    s,
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\">\
                     <title>{} {n}: {v:.4} [{:.4}, {:.4}]</title></rect>",
                    y(v),
                    (bar_w - 2.0).max(1.0),
                    (top + panel_h - y(v)).max(0.0),
                    r.model,
                    ci[0],
                    ci[1]
                );
                let cx = bx + (bar_w - 2.0).max(1.0) / 2.0;
                let _ = writeln!(
                    s,
                    "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                    y(ci[0]),
                    y(ci[1])
                );
            }
        }
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" x2=\"{}\" y1=\"{yb}\" y2=\"{yb}\" stroke=\"black\"/>",
            x0 + panel_w,
            yb = top + panel_h
        );
    }
    for (b, r) in reports.iter().enumerate() {
        let lx = left + (b % 6) as f64 * 180.0;
        let ly = top + panel_h + 40.0 + (b / 6) as f64 * 24.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{:.1}\">{}</text>",
            ly - 11.0,
            PALETTE[b % PALETTE.len()],
            lx + 20.0,
            ly,
            r.model
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 2.5, 5 × 10^n at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * e >= v - 1e-12 {
            return m * e;
        }
    }
    10.0 * e
}

/// Reads reports, compares them, prints nothing; writes `out` (Markdown) and
/// one SVG per mode beside it (`<stem>-blind.svg`, `<stem>-aware.svg`).
pub fn compare_files(paths: &[PathBuf], out: &Path) -> Result<(Comparison, Vec<PathBuf>)> {
    let reports = paths
        .iter()
        .map(|p| Report::read(p).map(|r| (p.clone(), r)))
        .collect::<Result<Vec<_>>>()?;
    if reports.is_empty() {
        return Err(EvalError::Report {
            path: out.to_path_buf(),
            reason: "nothing to compare: give report files".into(),
        });
    }
    let cmp = compare(&reports)?;
    write_file(out, &cmp.markdown)?;
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("compare");
    let mut written = Vec::new();
    for (mode, svg) in &cmp.charts {
        let p = out.with_file_name(format!("{stem}-{}.svg", mode.name()));
        write_file(&p, svg)?;
        written.push(p);
    }
    Ok((cmp, written))
}

#[cfg(test)]
mod tests {
    use super::super::metrics::Intervals;
    use super::*;

    fn report(model: &str, mode: Mode, recall: f64, split: &str) -> Report {
        let m = ScenarioMetrics {
            users: 10,
            recall,
            ndcg: recall / 2.0,
            mrr: 0.1,
            ci95: Intervals {
                recall: [recall - 0.01, recall + 0.01],
                ndcg: [0.0, 1.0],
                mrr: [0.0, 0.2],
            },
        };
        Report {
            model: model.into(),
            mode,
            k: 20,
            dataset: "d".into(),
            split: split.into(),
            seconds: 0.5,
            scenarios: [("uc".to_string(), m.clone()), ("warm".to_string(), m)]
                .into_iter()
                .collect(),
            params: serde_json::json!({}),
        }
    }

    #[test]
    fn json_contract_shape() {
        let v = serde_json::to_value(report("pop", Mode::Blind, 0.2, "s")).unwrap();
        assert_eq!(v["mode"], "blind");
        assert_eq!(v["scenarios"]["uc"]["users"], 10);
        assert!((v["scenarios"]["uc"]["ci95"]["recall"][1].as_f64().unwrap() - 0.21).abs() < 1e-12);
        for key in ["model", "k", "dataset", "split", "seconds"] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn compare_bolds_the_best_and_separates_modes() {
        let rs = vec![
            (PathBuf::from("a"), report("pop", Mode::Blind, 0.2, "s")),
            (PathBuf::from("b"), report("bpr", Mode::Blind, 0.3, "s")),
            (
                PathBuf::from("c"),
                report("scenariopop", Mode::Aware, 0.5, "s"),
            ),
        ];
        let c = compare(&rs).unwrap();
        assert_eq!(c.charts.len(), 2);
        let blind = c.markdown.split("### aware").next().unwrap();
        assert!(blind.contains("| bpr | **0.3000**"), "{}", c.markdown);
        assert!(blind.contains("| pop | 0.2000"), "{}", c.markdown);
        assert!(!blind.contains("scenariopop"), "modes never share a table");
        assert!(c.markdown.find("warm").unwrap() < c.markdown.find("uc R@").unwrap());
        assert!(c.charts[0].1.starts_with("<svg") && c.charts[0].1.contains("<title>bpr"));
    }

    #[test]
    fn compare_refuses_different_splits() {
        let rs = vec![
            (PathBuf::from("a"), report("pop", Mode::Blind, 0.2, "s1")),
            (PathBuf::from("b"), report("bpr", Mode::Blind, 0.3, "s2")),
        ];
        let err = compare(&rs).unwrap_err().to_string();
        assert!(err.contains("split digest"), "{err}");
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.43), 0.5);
        assert_eq!(nice_ceiling(0.07), 0.1);
        assert!((nice_ceiling(0.21) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn round_trip_through_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        let r = report("pop", Mode::Aware, 0.2, "s");
        r.write(&p).unwrap();
        assert_eq!(Report::read(&p).unwrap(), r);
        assert!(std::fs::read_to_string(d.path().join("r.md"))
            .unwrap()
            .contains("| uc | 10 |"));
        std::fs::write(&p, "{}").unwrap();
        assert!(Report::read(&p)
            .unwrap_err()
            .to_string()
            .contains("not a thaw eval report"));
    }
}
