//! The Grafana dashboard shipped with the Helm chart
//! (`helm/thaw/dashboards/thaw.json`) queries only what the engine exports.
//!
//! The engine's `/metrics` answers with [`Metrics::encode`] of the registry
//! that [`Metrics::new`] builds. Every family's descriptor (`# TYPE`) is in
//! that text even before it has a sample, so the exported sample names come
//! from the descriptors: `<family>_total` for a counter, `<family>` for a
//! gauge, `<family>_bucket`, `_sum` and `_count` for a histogram. The
//! label names come from samples, so the test records one of each kind the
//! dashboard groups or filters by (through the engine's own recording
//! methods) before encoding.
//!
//! Every PromQL expression in the dashboard (panel targets and template
//! variable queries) is tokenised: each identifier that is not a PromQL
//! function, aggregation or keyword is a metric name and must be exported;
//! each label in a matcher, a `by (...)` clause or a `{{label}}` legend must
//! be one of the labels of the metrics in that expression (or `le` of a
//! histogram's buckets, or a target label Prometheus adds when it scrapes).
//! `checker_rejects_what_the_engine_does_not_export` shows that a bogus
//! name or label fails the check.

use std::collections::{BTreeMap, BTreeSet};

use thaw::serve::metrics::Metrics;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/helm/thaw/dashboards/thaw.json"
);

/// Labels Prometheus attaches to every scraped series (the scrape job, the
/// target, and the Kubernetes service discovery of the ServiceMonitor).
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// PromQL functions and aggregations the dashboard may call, and keywords.
const FUNCTIONS: &[&str] = &[
    "abs",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_replace",
    "label_values",
    "last_over_time",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "stddev",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// What `/metrics` exports: sample name → label names seen on its samples.
#[derive(Debug, Default)]
struct Exported {
    samples: BTreeMap<String, BTreeSet<String>>,
    /// Sample names of histograms' buckets (they carry `le`).
    buckets: BTreeSet<String>,
}

fn exported(text: &str) -> Exported {
    let mut out = Exported::default();
    let mut family_of = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                panic!("malformed TYPE line {line:?}");
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "gauge" | "unknown" => vec![name.to_string()],
                "histogram" => {
                    out.buckets.insert(format!("{name}_bucket"));
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{name}{s}"))
                        .collect()
                }
                other => panic!("family {name} of type {other}: teach this test its samples"),
            };
            for n in names {
                family_of.insert(n.clone(), name.to_string());
                out.samples.entry(n).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            assert!(
                out.samples.contains_key(name),
                "sample {name} without a TYPE descriptor before it"
            );
            let labels: BTreeSet<String> = match line[name_end..].strip_prefix('{') {
                Some(rest) => {
                    let body = &rest[..rest.find('}').expect("closing brace")];
                    parse_matchers(body)
                        .into_iter()
                        .filter(|l| l != "le")
                        .collect()
                }
                None => BTreeSet::new(),
            };
            // A family's label names are its samples'; the histogram's three
            // sample names share them.
            let family = &family_of[name];
            let siblings: Vec<String> = family_of
                .iter()
                .filter(|(_, f)| *f == family)
                .map(|(s, _)| s.clone())
                .collect();
            for s in siblings {
                out.samples.get_mut(&s).unwrap().extend(labels.clone());
            }
        }
    }
    out
}

/// The engine's registry, with one sample of each labelled family.
fn engine_metrics() -> Exported {
    let m = Metrics::new();
    m.event("interactions", "applied");
    m.dead_letter("bad_json");
    m.unknown_relation("sequel_of");
    m.error("publish", "retryable");
    m.prequential(Some(3));
    m.prequential(None);
    m.set_graph(10, &[("co_interacted".to_string(), 4)]);
    m.propagation(4, 0.01);
    m.inference("text_encoder", "CPUExecutionProvider", 8, 0.02);
    m.set_provider("CPUExecutionProvider");
    m.redis_write(12, 0.003);
    m.redis_error();
    m.adaptation(2, 0.004);
    m.freshness("item", 0.05);
    m.ingest_delays(&[0.01]);
    m.set_lag("interactions", 0, 7);
    m.set_model("v1");
    m.published("item", 1);
    m.offsets_committed(1);
    exported(&m.encode())
}

/// Label names of a matcher list `a="x", b=~"y"` (values skipped).
fn parse_matchers(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(b, i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(body[start..i].to_string());
        } else {
            i += 1;
        }
    }
    out
}

/// The index just past the string literal opening at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != q {
        if b[j] == b'\\' && q != b'`' {
            j += 1;
        }
        j += 1;
    }
    assert!(
        j < b.len(),
        "unterminated string in {:?}",
        String::from_utf8_lossy(b)
    );
    j + 1
}

/// Metric names and label names a PromQL expression uses.
#[derive(Debug, Default, PartialEq)]
struct Uses {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn uses(expr: &str) -> Uses {
    let mut u = Uses::default();
    let b = expr.as_bytes();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < b.len() && (b[j] as char).is_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i] as char;
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(b, i);
        } else if c == '[' {
            // A range or subquery: durations and Grafana's $__rate_interval.
            i += expr[i..].find(']').expect("closing ]") + 1;
        } else if c == '{' {
            let end = i + expr[i..].find('}').expect("closing }");
            u.labels.extend(parse_matchers(&expr[i + 1..end]));
            i = end + 1;
        } else if c == '$' {
            // A Grafana variable: $name or ${name}.
            i += 1;
            if i < b.len() && b[i] == b'{' {
                i += expr[i..].find('}').expect("closing }") + 1;
            } else {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && i + 1 < b.len() && b[i + 1].is_ascii_digit()) {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let after = next_non_space(i);
            let call = after < b.len() && b[after] == b'(';
            if GROUPING.contains(&word) {
                assert!(call, "{word} without a label list in {expr:?}");
                let end = after + expr[after..].find(')').expect("closing )");
                u.labels.extend(parse_matchers(&expr[after + 1..end]));
                i = end + 1;
            } else if word == "label_values" && call {
                // label_values(metric, label): a Grafana template query.
                let end = after + expr[after..].find(')').expect("closing )");
                let args: Vec<&str> = expr[after + 1..end].split(',').map(str::trim).collect();
                match args.as_slice() {
                    [metric, label] => {
                        u.labels.insert(label.to_string());
                        u.metrics.extend(uses(metric).metrics);
                        u.labels.extend(uses(metric).labels);
                    }
                    _ => panic!("label_values needs (metric, label) here: {expr:?}"),
                }
                i = end + 1;
            } else if FUNCTIONS.contains(&word) || KEYWORDS.contains(&word) {
                // A function, an aggregation (`sum by (...) (...)` puts its
                // grouping before the parenthesis) or a keyword: its
                // arguments are scanned in turn.
            } else {
                u.metrics.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    u
}

/// Every PromQL query of a dashboard, with where it sits and its legend.
fn queries(dashboard: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String, Option<String>)>) {
        match v {
            serde_json::Value::Object(o) => {
                let title = o
                    .get("title")
                    .or_else(|| o.get("name"))
                    .and_then(|t| t.as_str())
                    .unwrap_or(title);
                if let Some(e) = o.get("expr").and_then(|e| e.as_str()) {
                    let legend = o
                        .get("legendFormat")
                        .and_then(|l| l.as_str())
                        .map(String::from);
                    out.push((title.to_string(), e.to_string(), legend));
                }
                if o.get("type").and_then(|t| t.as_str()) == Some("query") {
                    let q = o.get("query").and_then(|q| q.get("query").or(Some(q)));
                    if let Some(q) = q.and_then(|q| q.as_str()) {
                        out.push((format!("variable {title}"), q.to_string(), None));
                    }
                }
                for (_, child) in o {
                    walk(child, title, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "", &mut out);
    out
}

/// `{{label}}` names of a legend.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

/// Problems of `dashboard` against `exported`, one line each; also the
/// metric names it queries.
fn check(dashboard: &serde_json::Value, exported: &Exported) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut all = BTreeSet::new();
    let qs = queries(dashboard);
    if qs.is_empty() {
        problems.push("no queries found".to_string());
    }
    for (panel, expr, legend) in qs {
        let u = uses(&expr);
        if u.metrics.is_empty() {
            problems.push(format!("{panel}: {expr:?} queries no metric"));
        }
        let mut allowed: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        for m in &u.metrics {
            all.insert(m.clone());
            match exported.samples.get(m) {
                None => problems.push(format!(
                    "{panel}: {m} is not exported by the engine (expr {expr:?})"
                )),
                Some(labels) => {
                    allowed.extend(labels.iter().cloned());
                    if exported.buckets.contains(m) {
                        allowed.insert("le".into());
                    }
                }
            }
        }
        let legend = legend.as_deref().map(legend_labels).unwrap_or_default();
        for l in u.labels.iter().chain(&legend) {
            if !allowed.contains(l) {
                problems.push(format!(
                    "{panel}: label {l} is not on {:?} (labels: {allowed:?})",
                    u.metrics
                ));
            }
        }
    }
    (problems, all)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("the dashboard file");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let exported = engine_metrics();
    let (problems, used) = check(&dashboard(), &exported);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // What the dashboard is for: throughput and lag, freshness by kind, DLQ
    // and Redis errors, online quality, the inference provider.
    for m in [
        "thaw_ingest_events_total",
        "thaw_ingest_consumer_lag_messages",
        "thaw_publish_freshness_seconds_bucket",
        "thaw_ingest_dead_letters_total",
        "thaw_publish_redis_errors_total",
        "thaw_quality_hits_total",
        "thaw_quality_interactions_total",
        "thaw_quality_reciprocal_rank_total",
        "thaw_infer_provider_info",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
    eprintln!(
        "{} metrics queried, all exported: {}",
        used.len(),
        used.iter().cloned().collect::<Vec<_>>().join(", ")
    );
}

#[test]
fn checker_rejects_what_the_engine_does_not_export() {
    let exported = engine_metrics();
    // The encoder's view: descriptors without samples still give names.
    assert!(exported
        .samples
        .contains_key("thaw_quality_hit_rank_bucket"));
    assert!(exported.samples["thaw_publish_freshness_seconds_bucket"].contains("kind"));
    let with = |expr: &str, legend: &str| {
        serde_json::json!({"panels": [{"title": "t", "targets": [
            {"expr": expr, "legendFormat": legend}]}]})
    };
    let ok = with(
        r#"histogram_quantile(0.99, sum by (kind, le) (rate(thaw_publish_freshness_seconds_bucket{job=~"$job"}[$__rate_interval])))"#,
        "{{kind}}",
    );
    assert_eq!(check(&ok, &exported).0, Vec::<String>::new());
    for (expr, legend, why) in [
        (
            "sum(rate(thaw_bogus_total[5m]))",
            "",
            "a name nobody exports",
        ),
        (
            "sum(rate(thaw_ingest_events[5m]))",
            "",
            "a counter without _total",
        ),
        (
            "thaw_publish_freshness_seconds",
            "",
            "a histogram without a suffix",
        ),
        (
            "sum by (reason) (rate(thaw_ingest_events_total[5m]))",
            "",
            "a label the family lacks",
        ),
        (
            r#"thaw_graph_edges{kind="x"}"#,
            "",
            "a matcher on a label the family lacks",
        ),
        (
            "sum(thaw_graph_edges)",
            "{{relation}} {{model}}",
            "a legend label the family lacks",
        ),
        ("sum(rate(x_total[5m])) + 1", "", "a name outside thaw"),
    ] {
        let (problems, _) = check(&with(expr, legend), &exported);
        assert!(!problems.is_empty(), "{why} passed: {expr}");
    }
    // Parsing: durations, strings, variables and numbers are not metrics.
    assert_eq!(
        uses(
            r#"sum without (instance) (increase(thaw_quality_hits_total{job=~"$job", pod!="a b"}[1h] offset 5m)) / 2e3"#
        ),
        Uses {
            metrics: ["thaw_quality_hits_total".to_string()].into(),
            labels: ["instance", "job", "pod"].map(String::from).into(),
        }
    );
    assert_eq!(
        uses("label_values(thaw_serve_model_info, job)").metrics,
        ["thaw_serve_model_info".to_string()].into()
    );
}
