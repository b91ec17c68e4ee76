#!/usr/bin/env python3
"""Static checks of docker/ that need more than a linter: run by scripts/check-docker.

- docker-compose.yml against the Compose Specification JSON schema;
- cross-file consistency: compose addresses, the proxy TOML's backends and
  Prometheus' scrape targets describe the same fleet;
- the Grafana provisioning and dashboard: JSON parses, datasource uids
  match, and every PromQL expression names only metrics Switchyard exports.

Usage: check_stack.py --schema COMPOSE_SPEC_JSON [--docker-dir DIR]
Exit status 1 on any failure, with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

# The metric contract between the proxy, the backend and this dashboard.
# Histograms also export _bucket/_sum/_count series.
PROXY_COUNTERS_GAUGES = {
    "switchyard_requests_total",
    "switchyard_upstream_in_flight_requests",
    "switchyard_upstream_up",
    "switchyard_upstream_ready",
    "switchyard_upstream_queue_depth",
    "switchyard_upstream_cache_hit_ratio",
    "switchyard_retries_total",
    "switchyard_upstream_ejections_total",
    "switchyard_health_checks_total",
    "switchyard_config_reloads_total",
    "switchyard_config_last_reload_success_timestamp_seconds",
    "switchyard_route_split_weight",
    "switchyard_pool_fallbacks_total",
    "switchyard_rollout_state",
    "switchyard_rollout_checks_total",
    "switchyard_replica_state_version",
    "switchyard_replica_state_connected",
    "switchyard_replica_judge",
    "switchyard_config_info",
    "switchyard_ratelimit_decisions_total",
    "switchyard_shed_requests_total",
    "switchyard_backend_full_skips_total",
}
PROXY_HISTOGRAMS = {"switchyard_request_duration_seconds"}
BACKEND_COUNTERS_GAUGES = {
    "switchyard_embed_requests_total",
    "switchyard_embed_queue_depth",
    "switchyard_embed_queue_capacity",
    "switchyard_embed_in_flight_requests",
    "switchyard_embed_ready",
    "switchyard_embed_cache_hits_total",
    "switchyard_embed_cache_misses_total",
    "switchyard_embed_cache_errors_total",
}
BACKEND_HISTOGRAMS = {
    "switchyard_embed_request_duration_seconds",
    "switchyard_embed_queue_wait_seconds",
    "switchyard_embed_inference_duration_seconds",
    "switchyard_embed_batch_size",
}
# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def known_metrics() -> set[str]:
    names = set(PROXY_COUNTERS_GAUGES | BACKEND_COUNTERS_GAUGES | PROMETHEUS_SERIES)
    for h in PROXY_HISTOGRAMS | BACKEND_HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


PROMQL_WORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "group", "by", "without", "on", "ignoring",
    "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "day_of_month", "day_of_week", "day_of_year", "days_in_month",
    "delta", "deriv", "exp", "floor", "histogram_quantile", "histogram_count",
    "histogram_sum", "histogram_fraction", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "minute", "month", "predict_linear", "rate", "resets", "round", "scalar",
    "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (a lexer, not a parser)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                        # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                       # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                      # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in PROMQL_WORDS:
            continue
        # A number's exponent ("1e") or a duration unit is not a name.
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue
        names.add(word)
    return names


class Checker:
    def __init__(self, docker_dir: Path):
        self.dir = docker_dir
        self.errors: list[str] = []
        self.passed: list[str] = []

    def fail(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def ok(self, what: str) -> None:
        self.passed.append(what)

    def report(self, warnings: list[str]) -> int:
        """Prints the outcome; returns the exit status."""
        for p in self.passed:
            print(f"  ok: {p}")
        for w in warnings:
            print(f"  warning: {w}")
        for e in self.errors:
            print(f"  FAIL: {e}", file=sys.stderr)
        return 1 if self.errors else 0

    def load_yaml(self, path: Path):
        try:
            return yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            self.fail(str(path), f"cannot parse YAML: {e}")
            return None

    # --- compose -----------------------------------------------------------

    def compose(self, schema_path: Path):
        path = self.dir / "docker-compose.yml"
        doc = self.load_yaml(path)
        if doc is None:
            return None
        schema = json.loads(schema_path.read_text())
        validator = jsonschema.Draft7Validator(
            schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
        )
        errs = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for e in errs:
            loc = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            self.fail(f"{path.name} {loc}", e.message)
        if not errs:
            self.ok(f"{path.name} matches the Compose Specification schema")

        services = doc.get("services", {})
        before = len(self.errors)
        for name, svc in services.items():
            build = svc.get("build")
            if isinstance(build, dict):
                ctx = (self.dir / build.get("context", ".")).resolve()
                dockerfile = ctx / build.get("dockerfile", "Dockerfile")
                if not dockerfile.is_file():
                    self.fail(f"{path.name} services.{name}.build", f"{dockerfile} does not exist")
            for vol in svc.get("volumes", []):
                src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
                if src.startswith((".", "/")) and not (self.dir / src).exists():
                    self.fail(f"{path.name} services.{name}.volumes", f"bind source {src} does not exist")
            if "image" not in svc and "build" not in svc:
                self.fail(f"{path.name} services.{name}", "has neither image nor build")
        if len(self.errors) == before:
            self.ok("compose build contexts, Dockerfiles and bind-mount sources exist")
        return doc

    # --- fleet consistency -------------------------------------------------

    def fleet(self, compose, prom):
        toml_path = self.dir / "switchyard.compose.toml"
        try:
            cfg = tomllib.loads(toml_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            self.fail(toml_path.name, f"cannot parse TOML: {e}")
            return
        if compose is None:
            return
        before = len(self.errors)
        services = compose.get("services", {})

        def ip_of(svc):
            nets = svc.get("networks") or {}
            if isinstance(nets, dict):
                for net in nets.values():
                    if isinstance(net, dict) and net.get("ipv4_address"):
                        return net["ipv4_address"]
            return None

        backend_services = {n: s for n, s in services.items() if n.startswith("backend-")}
        compose_backends = {f"{ip_of(s)}:9100": n for n, s in backend_services.items()}
        toml_backends = {
            b["address"]: pool
            for pool, spec in cfg.get("pools", {}).items()
            for b in spec.get("backends", [])
        }
        for addr, svc in compose_backends.items():
            if addr not in toml_backends:
                self.fail(toml_path.name, f"compose service {svc} ({addr}) is in no pool")
        for addr, pool in toml_backends.items():
            if addr not in compose_backends:
                self.fail(toml_path.name, f"pools.{pool} backend {addr} is no compose service address")
        for addr, svc in compose_backends.items():
            pool = toml_backends.get(addr)
            version = (services[svc].get("environment") or {}).get("SWITCHYARD_BACKEND_VERSION", "")
            if pool and not version.startswith(f"{pool}-"):
                self.fail("docker-compose.yml", f"{svc} is in pool {pool} but labelled version {version!r}")

        proxy_ip = ip_of(services.get("proxy", {}))
        admin = cfg.get("admin", {}).get("address", "127.0.0.1:9901")
        if admin.startswith("127."):
            self.fail(toml_path.name, "admin.address is loopback: Prometheus could not scrape the proxy")

        for route in cfg.get("routes", []):
            for pool in (route.get("split") or {}):
                if pool not in cfg.get("pools", {}):
                    self.fail(toml_path.name, f"route split names unknown pool {pool}")

        if prom is not None:
            targets = {
                t: job.get("job_name")
                for job in prom.get("scrape_configs", [])
                for sc in job.get("static_configs", [])
                for t in sc.get("targets", [])
            }
            for svc in backend_services:
                if f"{svc}:9100" not in targets:
                    self.fail("prometheus.yml", f"backend service {svc} is not scraped")
            admin_port = admin.rsplit(":", 1)[-1]
            if f"proxy:{admin_port}" not in targets:
                self.fail("prometheus.yml", f"the proxy admin listener proxy:{admin_port} is not scraped")
            for t in targets:
                host = t.rsplit(":", 1)[0]
                if host not in services and host not in ("127.0.0.1", "localhost"):
                    self.fail("prometheus.yml", f"target {t} is no compose service")
        if proxy_ip is None:
            self.fail("docker-compose.yml", "the proxy service has no fixed ipv4_address")
        if len(self.errors) == before:
            self.ok("compose services, proxy pools and Prometheus targets agree")

    # --- grafana -----------------------------------------------------------

    def grafana(self, compose):
        gdir = self.dir / "grafana"
        ds_uids = set()
        for f in sorted((gdir / "provisioning" / "datasources").glob("*.y*ml")):
            doc = self.load_yaml(f)
            for ds in (doc or {}).get("datasources", []):
                ds_uids.add(ds.get("uid"))
        if not ds_uids:
            self.fail("grafana/provisioning/datasources", "no datasource with a uid is provisioned")

        provider_paths = set()
        for f in sorted((gdir / "provisioning" / "dashboards").glob("*.y*ml")):
            doc = self.load_yaml(f)
            for p in (doc or {}).get("providers", []):
                provider_paths.add(p.get("options", {}).get("path"))
        if compose is not None:
            mounts = {
                v.split(":")[1]: v.split(":")[0]
                for v in compose.get("services", {}).get("grafana", {}).get("volumes", [])
                if isinstance(v, str) and v.count(":") >= 1
            }
            for p in provider_paths:
                if p not in mounts:
                    self.fail("grafana/provisioning/dashboards", f"provider path {p} is not mounted in the grafana service")

        known = known_metrics()
        dashboards = sorted((gdir / "dashboards").glob("*.json"))
        if not dashboards:
            self.fail("grafana/dashboards", "no dashboard JSON")
        for f in dashboards:
            try:
                dash = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                self.fail(str(f.relative_to(self.dir)), f"invalid JSON: {e}")
                continue
            rel = str(f.relative_to(self.dir))
            before = len(self.errors)
            for key in ("uid", "title", "panels", "schemaVersion"):
                if key not in dash:
                    self.fail(rel, f"missing top-level {key!r}")
            seen_ids = set()
            exprs = 0

            def walk(panels):
                nonlocal exprs
                for panel in panels:
                    pid = panel.get("id")
                    where = f"{rel} panel {pid} {panel.get('title', '')!r}"
                    if pid in seen_ids:
                        self.fail(where, "duplicate panel id")
                    seen_ids.add(pid)
                    if panel.get("type") != "row" and "gridPos" not in panel:
                        self.fail(where, "no gridPos")
                    ds = panel.get("datasource")
                    if isinstance(ds, dict) and ds.get("uid") not in ds_uids:
                        self.fail(where, f"datasource uid {ds.get('uid')!r} is not provisioned")
                    for t in panel.get("targets", []):
                        expr = t.get("expr", "")
                        if not expr:
                            self.fail(where, f"target {t.get('refId')} has no expr")
                            continue
                        exprs += 1
                        if expr.count("(") != expr.count(")"):
                            self.fail(where, f"unbalanced parentheses in {expr!r}")
                        for name in sorted(metric_names(expr) - known):
                            self.fail(where, f"unknown metric {name!r} in {expr!r}")
                    walk(panel.get("panels", []))

            walk(dash.get("panels", []))
            for var in dash.get("templating", {}).get("list", []):
                q = var.get("query")
                q = q.get("query", "") if isinstance(q, dict) else (q or "")
                for name in re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", q):
                    if name not in known:
                        self.fail(f"{rel} variable {var.get('name')}", f"unknown metric {name!r}")
            if exprs == 0:
                self.fail(rel, "no PromQL expressions")
            if len(self.errors) == before:
                self.ok(f"{rel}: {len(seen_ids)} panels, {exprs} queries, only known metrics")

        required_panels = {
            "traffic by pool": r"switchyard_requests_total",
            "latency histogram": r"switchyard_request_duration_seconds_bucket",
            "in-flight": r"in_flight",
            "queue depth": r"queue_depth",
            "cache hit rate": r"cache_hit",
            "backend health": r"switchyard_upstream_up|switchyard_upstream_ready",
            "reloads": r"switchyard_config_reloads_total",
        }
        blob = "".join(f.read_text() for f in dashboards)
        for what, pattern in required_panels.items():
            if not re.search(pattern, blob):
                self.fail("grafana/dashboards", f"no panel shows {what}")

    def prometheus_rules(self):
        """Rule files use only known metrics (promtool checks their syntax)."""
        known = known_metrics()
        recorded = set()
        files = sorted((self.dir / "prometheus" / "rules").glob("*.y*ml"))
        docs = [(f, self.load_yaml(f)) for f in files]
        for _, doc in docs:
            for g in (doc or {}).get("groups", []):
                for r in g.get("rules", []):
                    if "record" in r:
                        recorded.add(r["record"])
        for f, doc in docs:
            for g in (doc or {}).get("groups", []):
                for r in g.get("rules", []):
                    name = r.get("record") or r.get("alert")
                    for m in sorted(metric_names(str(r.get("expr", ""))) - known - recorded):
                        self.fail(f"prometheus/rules/{f.name} {name}", f"unknown metric {m!r}")
        if files and not any(e.startswith("prometheus/rules/") for e in self.errors):
            self.ok("Prometheus rules use only known metrics")


def unexported_metrics(repo: Path) -> list[str]:
    """Contract metrics that no source file defines yet (a warning, not a
    failure: the dashboard may lead the code it describes)."""
    def sources(d: Path) -> str:
        return "".join(f.read_text(errors="replace") for f in d.rglob("*.rs")) if d.is_dir() else ""
    proxy, backend = sources(repo / "proxy" / "src"), sources(repo / "backend" / "src")
    missing = []
    if proxy:
        for m in sorted(PROXY_COUNTERS_GAUGES | PROXY_HISTOGRAMS):
            if f'"{m}"' not in proxy:
                missing.append(m)
    if backend:
        for m in sorted(BACKEND_COUNTERS_GAUGES | BACKEND_HISTOGRAMS):
            suffix = m.removeprefix("switchyard_embed_")
            if f'"{m}"' not in backend and f'"{suffix}"' not in backend:
                missing.append(m)
    return missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schema", required=True, type=Path, help="Compose Specification JSON schema")
    ap.add_argument("--docker-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()

    c = Checker(args.docker_dir.resolve())
    compose = c.compose(args.schema)
    prom = c.load_yaml(c.dir / "prometheus" / "prometheus.yml")
    c.fleet(compose, prom)
    c.grafana(compose)
    c.prometheus_rules()
    warnings = [
        f"{m} is on the dashboard but not defined in proxy/src or backend/src yet"
        for m in unexported_metrics(c.dir.parent)
    ]
    return c.report(warnings)


if __name__ == "__main__":
    sys.exit(main())
