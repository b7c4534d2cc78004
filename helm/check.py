"""`make helm-check`: lint the chart strictly, render it with the default and
the example values, and validate every manifest offline.

- lint: Helm v4's linter (helm-python-sdk), strict (a warning fails), with
  each values file;
- render: values.schema.json checked, then the templates rendered as an
  install would; the schema must also refuse replicaCount: 2 without
  scaleOut (two instances in one group would split the catalogue topics)
  and a redis.url in the ConfigMap; scaled out, the workload must be a
  StatefulSet whose pods take their name as kafka.replica_id;
- validate: every Kubernetes object against Kubernetes' own OpenAPI schemas
  (kubernetes-validate, strict: unknown fields fail) at the chart's oldest
  supported version and the newest the tool knows; the ServiceMonitor, a CRD
  those schemas lack, against helm/schemas/servicemonitor-v1.json (a subset
  of the Prometheus Operator's CRD schema, see its description);
- the ConfigMap's thaw.toml must parse as TOML with integer settings written
  as integers, and the dashboard ConfigMap must hold dashboards/thaw.json.

The rendered manifests are written to OUT/<values>/ (default target/helm).
"""

import json
import pathlib
import sys
import time
import tomllib

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent
CHART = ROOT / "thaw"
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
SERVICE_MONITOR_SCHEMA = json.loads((ROOT / "schemas" / "servicemonitor-v1.json").read_text())
VALUE_SETS = {
    "default": None,
    "example": CHART / "ci" / "example-values.yaml",
    "scale-out": CHART / "ci" / "scale-out-values.yaml",
}
failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def lint(name, values):
    report = helm_python.lint(str(CHART), values, strict=True, namespace="thaw",
                              kube_version="v" + KUBE_VERSIONS[0])
    bad = [m for m in report["messages"] if m["severity"] >= 2] + [
        {"severity": 3, "path": "", "error": e} for e in report["errors"]]
    for m in report["messages"]:
        print(f"  lint {name}: [{m['severity']}] {m['path']}: {m['error']}")
    if report["total_charts_linted"] != 1:
        fail(f"lint {name}: {report['total_charts_linted']} charts linted, expected 1")
    for m in bad:
        fail(f"lint {name}: {m['path']}: {m['error']}")
    return not bad


def refused(chart, values, what):
    try:
        chart.validate_schema(values)
    except helm_python.HelmValuesError as e:
        print(f"  schema refuses {what}: {' '.join(str(e).split())[:200]}")
        return
    fail(f"values.schema.json accepts {what}")


def render(chart, name, values, out):
    chart.validate_schema(values)
    files = chart.render(values, name="thaw", namespace="thaw", is_install=True)
    docs = []
    out.mkdir(parents=True, exist_ok=True)
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    with open(out / "manifests.yaml", "w") as f:
        for path, doc in docs:
            f.write(f"---\n# Source: {path}\n")
            yaml.safe_dump(doc, f, sort_keys=False)
    print(f"  render {name}: {len(docs)} objects -> {out / 'manifests.yaml'}")
    return docs


def validate(name, docs):
    kinds = []
    for path, doc in docs:
        kind = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        kinds.append(doc.get("kind"))
        if doc.get("apiVersion") == "monitoring.coreos.com/v1":
            try:
                jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(doc)
            except jsonschema.ValidationError as e:
                fail(f"{name}: {kind} ({path}): {e.message} at {list(e.absolute_path)}")
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{name}: {kind} ({path}) on Kubernetes {v}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{name}: {kind} ({path}): no schema for Kubernetes {v}: {e}")
    print(f"  validate {name}: {', '.join(sorted(kinds))}")
    return kinds


def check_config(name, docs, values):
    cms = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "ConfigMap"}
    cfg = next((d for d in cms.values() if "thaw.toml" in d.get("data", {})), None)
    if cfg is None:
        fail(f"{name}: no ConfigMap with thaw.toml")
        return
    toml = tomllib.loads(cfg["data"]["thaw.toml"])
    merged = helm_python.Chart.load(str(CHART)).merge_values(values)
    want_port = merged["service"]["port"]
    if toml.get("http", {}).get("listen") != f"0.0.0.0:{want_port}":
        fail(f"{name}: thaw.toml http.listen {toml.get('http')} != 0.0.0.0:{want_port}")
    if toml.get("model", {}).get("dir") != merged["model"]["mountPath"]:
        fail(f"{name}: thaw.toml model.dir is not model.mountPath")
    top_k = toml.get("users", {}).get("top_k")
    if not isinstance(top_k, int):
        fail(f"{name}: users.top_k is {top_k!r}, not an integer (the engine refuses floats)")
    if toml.get("kafka", {}).get("brokers") != merged["config"]["kafka"]["brokers"]:
        fail(f"{name}: kafka.brokers not carried into thaw.toml")
    (OUT / name / "thaw.toml").write_text(cfg["data"]["thaw.toml"])
    dash = [d for d in cms.values() if "thaw.json" in d.get("data", {})]
    if merged["dashboard"]["enabled"]:
        if len(dash) != 1:
            fail(f"{name}: {len(dash)} dashboard ConfigMaps, expected 1")
        elif json.loads(dash[0]["data"]["thaw.json"]) != json.loads((CHART / "dashboards" / "thaw.json").read_text()):
            fail(f"{name}: the dashboard ConfigMap differs from dashboards/thaw.json")
        elif dash[0]["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            fail(f"{name}: the dashboard ConfigMap lacks the label grafana_dashboard: \"1\"")
    scaled = merged["scaleOut"]["enabled"]
    kind = "StatefulSet" if scaled else "Deployment"
    deploy = next((d for _, d in docs if d["kind"] == kind), None)
    if deploy is None:
        fail(f"{name}: no {kind} rendered")
        return
    spec = deploy["spec"]["template"]["spec"]
    c = spec["containers"][0]
    if c["livenessProbe"]["httpGet"]["path"] != "/healthz" or c["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail(f"{name}: probes are not /healthz and /readyz")
    if not scaled and deploy["spec"].get("replicas", 1) != 1:
        fail(f"{name}: {deploy['spec']['replicas']} replicas of one instance")
    env = {e["name"]: e for e in c.get("env", [])}
    replica = env.get("THAW__KAFKA__REPLICA_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if scaled and replica != "metadata.name":
        fail(f"{name}: scaled out, but kafka.replica_id is not the pod's name ({env.get('THAW__KAFKA__REPLICA_ID')})")
    if not scaled and "THAW__KAFKA__REPLICA_ID" in env:
        fail(f"{name}: one instance with a replica id")
    if spec["securityContext"].get("runAsNonRoot") is not True:
        fail(f"{name}: the pod may run as root")


OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/helm").resolve()
t0 = time.monotonic()
chart = helm_python.Chart.load(str(CHART))
print(f"chart {chart.name} {chart.version} (Helm SDK {helm_python.helm_sdk_version()}), Kubernetes {', '.join(KUBE_VERSIONS)}")
for name, path in VALUE_SETS.items():
    values = helm_python.values_from_yaml(path.read_text()) if path else {}
    lint(name, values)
    docs = render(chart, name, values, OUT / name)
    kinds = validate(name, docs)
    check_config(name, docs, values)
    if name == "example":
        for k in ("ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            if k not in kinds:
                fail(f"example: no {k} rendered")
    if name == "scale-out":
        hpa = next((d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler"), None)
        if hpa is None or hpa["spec"]["scaleTargetRef"]["kind"] != "StatefulSet":
            fail("scale-out: the HPA does not scale the StatefulSet")
refused(chart, {"replicaCount": 2}, "replicaCount: 2")
refused(chart, {"autoscaling": {"enabled": True, "maxReplicas": 3}}, "autoscaling.maxReplicas: 3")
refused(chart, {"config": {"redis": {"url": "redis://:secret@r:6379"}}}, "a Redis URL in the ConfigMap")
refused(chart, {"config": {"kafka": {"brokers": "k:9092", "brokerz": "x"}}}, "an unknown kafka setting")
print(f"helm-check: {'FAILED, ' + str(len(failures)) + ' problems' if failures else 'ok'} in {time.monotonic() - t0:.1f} s")
sys.exit(1 if failures else 0)
