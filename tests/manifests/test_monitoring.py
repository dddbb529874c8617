"""manifests/monitoring/: the PrometheusRule against its CRD's schema, the Grafana dashboard
against the dashboard JSON model's required fields, and every PromQL expression in them naming
only metrics the trainer exports (ray_jobs/train/sinks.py, as Ray serves them: ray_<name>)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from operators.schema import build_validation_schema
from ray_jobs.train.sinks import PROMETHEUS_METRICS
from tests.manifests.conftest import MANIFESTS, kustomize

MONITORING = MANIFESTS / "monitoring"
CRD = Path(__file__).parent / "schemas" / "monitoring.coreos.com_prometheusrules.yaml"
EXPORTED = {f"ray_{name}" for name in PROMETHEUS_METRICS}

# The dashboard JSON model's required fields (Grafana's dashboard schema, schemaVersion 39:
# a dashboard has a title, a schema version and panels; a panel a type and a grid position of
# h, w, x, y; a Prometheus query target a refId and an expression), plus what this dashboard
# must carry to be importable by uid.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating"],
    "properties": {
        "uid": {"type": "string", "minLength": 1, "maxLength": 40},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos", "targets"],
            "properties": {
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"],
                            "properties": {k: {"type": "integer", "minimum": 0}
                                           for k in ("h", "w", "x", "y")}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr"],
                    "properties": {"expr": {"type": "string", "minLength": 1}}}},
            },
        }},
    },
}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once label matchers,
    grouping clauses, strings, ranges and numbers are gone, that are neither functions nor
    keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group() in KEYWORDS:
            continue
        if m.start() and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # 1.5e3, 10m
        names.add(m.group())
    return names


def _rule() -> dict:
    return yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())


def _dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def test_the_extractor_finds_what_it_must():
    assert metric_names('rate(foo_total{a="b"}[5m]) / on (x) bar > 1.5') == {"foo_total", "bar"}
    assert metric_names("time() - max by (run) (ray_x_seconds) > 900") == {"ray_x_seconds"}


def test_prometheus_rule_fits_its_crd_schema():
    crd = yaml.safe_load(CRD.read_text())
    schema = build_validation_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    rule = _rule()
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    # the API server's semantics (draft 4); the CRD's patterns are Go's RE2 (one, `(?i)` after
    # `^`, is not Python's), so the schema itself is not checked as a Python-regex schema
    validator = jsonschema.Draft4Validator(schema)
    validator.validate(rule)
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"RingpilotStepSlowerThanPlan", "RingpilotNoProgress",
                           "RingpilotEvaluationFailing"}
    assert "> 1.5" in alerts["RingpilotStepSlowerThanPlan"]["expr"]
    assert alerts["RingpilotStepSlowerThanPlan"]["for"] == "10m"
    assert "> 900" in alerts["RingpilotNoProgress"]["expr"]  # 15 minutes without a step


def test_grafana_dashboard_fits_the_dashboard_model():
    dash = _dashboard()
    jsonschema.validate(dash, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("step time", "tokens per second", "loss", "evaluation", "hop wait", "restarts"):
        assert topic in titles, topic


def test_every_promql_expression_names_exported_metrics():
    exprs = [r["expr"] for g in _rule()["spec"]["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    # Grafana's label_values(METRIC, LABEL) is not PromQL: its metric is the first argument
    exprs += [re.fullmatch(r"label_values\((.+),\s*\w+\)", v["definition"]).group(1)
              for v in _dashboard()["templating"]["list"] if "definition" in v]
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= EXPORTED, f"{expr!r} names {sorted(names - EXPORTED)}, not exported"


def test_monitoring_kustomization_builds():
    kinds = sorted(o["kind"] for o in kustomize("monitoring"))
    assert kinds == ["ConfigMap", "PrometheusRule"]
