"""Renders helm/meshserve with Helm's own Go template engine (helm-python-sdk binds the Helm v4
Go SDK; no helm binary, no cluster) and reads the manifests back as Python objects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "meshserve"
KUBE_VERSION = "1.30.0"  # manifests are checked against this version's schemas
RELEASE = "demo"
FULLNAME = f"{RELEASE}-meshserve"
NAMESPACE = "ml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A duplicate mapping key is an error (kubectl refuses it; PyYAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [k.value for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        dup = {k for k in keys if keys.count(k) > 1}  # merged-in (<<) keys may be overridden
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}",
                                                    node.start_mark)
        return super().construct_mapping(node, deep=deep)


@dataclass
class Rendered:
    docs: list[dict]  # every manifest, in file order
    text: str  # all manifests as rendered, NOTES.txt excluded
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def worker_sets(self) -> list[dict]:
        """The workers' StatefulSets, one per replica (the built-in Redis is one too)."""
        return [d for d in self.of_kind("StatefulSet")
                if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]


def render(values: dict | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs, texts, notes = [], [], ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        texts.append(text)
        docs += [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d]
    return Rendered(docs, "\n---\n".join(texts), notes)


def container(workload: dict, name: str, init: bool = False) -> dict:
    spec = workload["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers" if init else "containers", [])
             if c["name"] == name]
    assert len(found) == 1, f"container {name} in {workload['metadata']['name']}"
    return found[0]


def env_of(c: dict) -> dict[str, dict]:
    """name -> the env entry ({value: ...} or {valueFrom: ...})."""
    return {e["name"]: e for e in c.get("env", [])}


def expand(args: list[str], env: dict[str, str], strict: bool = True) -> list[str]:
    """What the kubelet does to a container's args (and env values): $(NAME) -> the value of env
    var NAME. strict: a NAME env does not hold is an error (the kubelet leaves it as it is)."""
    def value(m: re.Match) -> str:
        return env[m.group(1)] if strict else env.get(m.group(1), m.group(0))

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, a) for a in args]


def flag(args: list[str], name: str) -> str:
    """The value after `name` in args (it must appear exactly once)."""
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def lint(values: dict | None = None) -> dict:
    return helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
