#!/usr/bin/env python3
"""Static checks of docker/kubernetes/ beyond the API schemas: run by
scripts/check-docker, after kubernetes-validate has checked every manifest
against the Kubernetes schemas. No cluster, no kustomize binary needed.

- kustomization.yaml names only files that exist, and every manifest and
  generator input in the directory is named;
- each Service selects a workload's pods and names ports those pods have;
  probes and the prometheus.io/port annotation name ports of their pod;
- every ConfigMap a pod mounts is defined here; every Secret it uses is
  explained in README.md (Secrets are created by hand, never committed);
- the HPA scales a workload defined here, on a pods metric that a
  prometheus-adapter rule serves from a metric the backend exports;
- the proxy config (a configMapGenerator input): its pools' backends and
  dns names are Services here, on their ports, and the files it reads lie in the pod's mounts.

Usage: check_kubernetes.py [--dir DIR]
Exit status 1 on any failure, with one line per problem.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path, PurePosixPath

import yaml

from check_stack import Checker, known_metrics

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


class KubeChecker(Checker):
    def __init__(self, kdir: Path):
        super().__init__(kdir)
        self.kust = self.load_yaml(kdir / "kustomization.yaml") or {}
        self.generated = {g.get("name"): g for g in self.kust.get("configMapGenerator", [])}
        self.docs: list[tuple[str, dict]] = []
        for name in self.kust.get("resources", []):
            path = kdir / name
            try:
                self.docs += [(name, d) for d in yaml.safe_load_all(path.read_text()) if d]
            except (OSError, yaml.YAMLError) as e:
                self.fail(f"kustomization.yaml resources {name}", f"cannot read: {e}")

    def of_kind(self, *kinds: str) -> list[tuple[str, dict]]:
        return [(f, d) for f, d in self.docs if d.get("kind") in kinds]

    def where(self, f: str, d: dict) -> str:
        return f"{f} {d.get('kind')}/{d.get('metadata', {}).get('name')}"

    # --- kustomization -----------------------------------------------------

    def kustomization(self):
        before = len(self.errors)
        listed = set(self.kust.get("resources", []))
        inputs = {f for g in self.generated.values() for f in g.get("files", [])}
        for name in sorted(listed | inputs):
            if not (self.dir / name).is_file():
                self.fail("kustomization.yaml", f"{name} does not exist")
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if name in ("kustomization.yaml", "README.md") or name in listed | inputs:
                continue
            what = "resources" if path.suffix in (".yaml", ".yml") else "configMapGenerator files"
            self.fail("kustomization.yaml", f"{name} is in the directory but not in {what}")
        if len(self.errors) == before:
            self.ok(f"kustomization.yaml: {len(listed)} resources and {len(inputs)} generator inputs, all present")

    # --- pods, services, config objects --------------------------------------

    def pods(self) -> list[tuple[str, dict, dict]]:
        """(where, template labels, pod spec) of every workload."""
        return [
            (self.where(f, d), d["spec"]["template"]["metadata"].get("labels", {}), d["spec"]["template"])
            for f, d in self.of_kind(*WORKLOADS)
        ]

    @staticmethod
    def ports(template: dict) -> tuple[set[str], set[int]]:
        containers = template["spec"].get("containers", [])
        named = {p["name"] for c in containers for p in c.get("ports", []) if "name" in p}
        numbers = {p["containerPort"] for c in containers for p in c.get("ports", [])}
        return named, numbers

    def port_known(self, port, template: dict) -> bool:
        named, numbers = self.ports(template)
        return port in named if isinstance(port, str) else int(port) in numbers

    def services(self):
        before = len(self.errors)
        pods = self.pods()
        for f, svc in self.of_kind("Service"):
            where = self.where(f, svc)
            selector = svc["spec"].get("selector") or {}
            chosen = [t for _, labels, t in pods if selector and selector.items() <= labels.items()]
            if not chosen:
                self.fail(where, f"selector {selector} matches no workload's pods")
            for p in svc["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                for t in chosen:
                    if not self.port_known(target, t):
                        self.fail(where, f"targetPort {target!r} is no container port of the selected pods")
        if len(self.errors) == before:
            self.ok("Services select workloads and name their ports")

    def pod_references(self):
        before = len(self.errors)
        readme = (self.dir / "README.md").read_text() if (self.dir / "README.md").is_file() else ""
        configmaps = {d["metadata"]["name"] for _, d in self.of_kind("ConfigMap")} | set(self.generated)
        for where, _, template in self.pods():
            spec = template["spec"]
            port = template["metadata"].get("annotations", {}).get("prometheus.io/port")
            if port is not None and not self.port_known(int(port), template):
                self.fail(where, f"prometheus.io/port {port} is no container port")
            for c in spec.get("containers", []):
                for probe in PROBES:
                    action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                    if action and not self.port_known(action["port"], template):
                        self.fail(where, f"{c['name']} {probe} port {action['port']!r} is no container port")
            for v in spec.get("volumes", []):
                if "configMap" in v and v["configMap"]["name"] not in configmaps:
                    self.fail(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not defined here")
            for secret in self.secrets(spec):
                if secret not in readme:
                    self.fail(where, f"Secret {secret} is used but README.md never says how to create it")
        if len(self.errors) == before:
            self.ok("probes, scrape ports, ConfigMaps and Secrets of every pod resolve")

    @staticmethod
    def secrets(spec: dict) -> set[str]:
        names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec.get("containers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
        return names

    # --- autoscaling ---------------------------------------------------------

    def adapter_rules(self) -> list[dict]:
        rules = []
        for _, cm in self.of_kind("ConfigMap"):
            text = cm.get("data", {}).get("config.yaml")
            if text:
                rules += (yaml.safe_load(text) or {}).get("rules", [])
        return rules

    def autoscaling(self):
        before = len(self.errors)
        workloads = {(d["kind"], d["metadata"]["name"]) for _, d in self.of_kind(*WORKLOADS)}
        known = known_metrics()
        served = {}
        for rule in self.adapter_rules():
            series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule.get("seriesQuery", ""))
            series = series.group(0) if series else ""
            if series not in known:
                self.fail("prometheus-adapter rule", f"series {series!r} is no metric Switchyard exports")
            overrides = rule.get("resources", {}).get("overrides", {})
            if {"namespace", "pod"} - overrides.keys():
                self.fail(f"prometheus-adapter rule {series}", "does not map the namespace and pod labels")
            served[rule.get("name", {}).get("as") or series] = series
        hpas = self.of_kind("HorizontalPodAutoscaler")
        for f, hpa in hpas:
            where = self.where(f, hpa)
            target = hpa["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in workloads:
                self.fail(where, f"scales {target['kind']}/{target['name']}, which is not defined here")
            for m in hpa["spec"].get("metrics", []):
                name = m.get("pods", {}).get("metric", {}).get("name")
                if m["type"] == "Pods" and name not in served:
                    self.fail(where, f"pods metric {name!r} is served by no prometheus-adapter rule")
        if hpas and len(self.errors) == before:
            self.ok(f"{len(hpas)} HPA(s) scale defined workloads on metrics the adapter rules serve")

    # --- the proxy's config --------------------------------------------------

    def proxy_config(self):
        before = len(self.errors)
        services = {d["metadata"]["name"]: {p["port"] for p in d["spec"].get("ports", [])}
                    for _, d in self.of_kind("Service")}
        for cm_name, gen in self.generated.items():
            for toml_name in (f for f in gen.get("files", []) if f.endswith(".toml")):
                try:
                    cfg = tomllib.loads((self.dir / toml_name).read_text())
                except (OSError, tomllib.TOMLDecodeError) as e:
                    self.fail(toml_name, f"cannot parse TOML: {e}")
                    continue
                for pool, spec in cfg.get("pools", {}).items():
                    named = [b["address"] for b in spec.get("backends", [])]
                    named += [spec["dns"]] if "dns" in spec else []
                    for address in named:
                        host, _, port = address.rpartition(":")
                        if not port.isdigit() or int(port) not in services.get(host, set()):
                            self.fail(toml_name, f"pools.{pool}: {address} is no Service port here")
                https = cfg.get("listeners", {}).get("https", {})
                self.proxy_mounts(cm_name, toml_name, [https.get("cert", ""), https.get("key", "")])
        if len(self.errors) == before:
            self.ok("the proxy config's pools name Services here and its files lie in the pod's mounts")

    def proxy_mounts(self, cm_name: str, toml_name: str, tls_files: list[str]):
        """The pod reading `cm_name` finds the config at its --config path and
        the TLS files in a Secret volume."""
        for where, _, template in self.pods():
            spec = template["spec"]
            kinds = {v["name"]: ("configMap", v["configMap"]["name"]) if "configMap" in v
                     else ("secret", v["secret"]["secretName"]) if "secret" in v else ("other", "")
                     for v in spec.get("volumes", [])}
            if ("configMap", cm_name) not in kinds.values():
                continue
            for c in spec.get("containers", []):
                args = c.get("args", [])
                if "--config" not in args[:-1]:
                    continue
                mounts = {PurePosixPath(m["mountPath"]): kinds.get(m["name"]) for m in c.get("volumeMounts", [])}
                config = PurePosixPath(args[args.index("--config") + 1])
                if mounts.get(config.parent) != ("configMap", cm_name) or config.name != toml_name:
                    self.fail(where, f"--config {config} is not {toml_name} in the {cm_name} mount")
                for f in tls_files:
                    if (mounts.get(PurePosixPath(f).parent) or ("",))[0] != "secret":
                        self.fail(where, f"{toml_name} reads {f}, which is in no Secret mount")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent / "kubernetes")
    args = ap.parse_args()

    c = KubeChecker(args.dir.resolve())
    c.kustomization()
    c.services()
    c.pod_references()
    c.autoscaling()
    c.proxy_config()
    return c.report([])


if __name__ == "__main__":
    sys.exit(main())
