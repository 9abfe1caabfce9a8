"""JSON Schemas for custom resources, derived from the projects' own CRDs.

    python tests/schemas/crd2schema.py                      # fetch the pinned tags from GitHub
    python tests/schemas/crd2schema.py --git kubernetes-sigs/gateway-api=/path/to/clone ...
    python tests/schemas/crd2schema.py --only BackendTrafficPolicy --git envoyproxy/gateway=/path/to/clone

For each source below, the CRD file at a released tag is read (from a local
clone given with --git, else raw.githubusercontent.com), and each kept
(kind, version)'s ``openAPIV3Schema`` becomes one Draft 2020-12 JSON Schema in
``tests/schemas/crd/``, named ``<group>_<kind>_<version>.json``. The source
(repo, tag, commit, path) is recorded in the schema's ``$comment`` and in
``tests/schemas/crd/SOURCES.json``; tests/schemas/README.md lists them.

The conversion follows the API server's structural-schema rules:

* an object with ``properties`` and neither ``additionalProperties`` nor
  ``x-kubernetes-preserve-unknown-fields`` is closed (``additionalProperties:
  false``): the API server prunes unknown fields (and rejects them with
  ``kubectl apply --validate=strict``, the default since 1.27), so a misspelt
  field must fail here;
* ``x-kubernetes-int-or-string`` -> integer or string; ``nullable`` -> null allowed;
* ``metadata`` gets the ObjectMeta fields a manifest sets (closed);
* descriptions are dropped (size) and CEL rules (``x-kubernetes-validations``)
  are dropped: there is no CEL evaluator here; tests restate the rules that matter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parent / "crd"

#: (repo, tag, path in the repo, {kind: [versions]}). Released tags only, so
#: a regenerated schema changes only when a tag here changes.
SOURCES = [
    ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml",
     {"HTTPRoute": ["v1"]}),
    ("kubernetes-sigs/gateway-api", "v1.6.1", "config/crd/standard/gateway.networking.k8s.io_gateways.yaml",
     {"Gateway": ["v1"]}),
    ("kubernetes-sigs/gateway-api-inference-extension", "v1.6.0",
     "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", {"InferencePool": ["v1"]}),
    ("envoyproxy/gateway", "v1.9.0",
     "charts/gateway-crds-helm/templates/generated/gateway.envoyproxy.io_envoyextensionpolicies.yaml",
     {"EnvoyExtensionPolicy": ["v1alpha1"]}),
    ("envoyproxy/gateway", "v1.9.0",
     "charts/gateway-crds-helm/templates/generated/gateway.envoyproxy.io_clienttrafficpolicies.yaml",
     {"ClientTrafficPolicy": ["v1alpha1"]}),
    ("envoyproxy/gateway", "v1.9.0",
     "charts/gateway-crds-helm/templates/generated/gateway.envoyproxy.io_backendtrafficpolicies.yaml",
     {"BackendTrafficPolicy": ["v1alpha1"]}),
    ("envoyproxy/gateway", "v1.9.0",
     "charts/gateway-crds-helm/templates/generated/gateway.envoyproxy.io_backends.yaml", {"Backend": ["v1alpha1"]}),
    ("prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", {"PodMonitor": ["v1"]}),
    ("istio/api", "1.30.3", "kubernetes/customresourcedefinitions.gen.yaml",
     {"EnvoyFilter": ["v1alpha3"], "VirtualService": ["v1"], "DestinationRule": ["v1"]}),
]

#: ObjectMeta fields a manifest sets; the rest (uid, managedFields, ...) the server owns.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}

_DROP = {"description", "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
         "x-kubernetes-map-type", "x-kubernetes-embedded-resource"}


def convert(node: Any) -> Any:
    """One openAPIV3Schema node -> JSON Schema (structural rules above)."""
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: convert(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = convert(value)
        elif key in ("nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_documents(text: str) -> list[dict]:
    # Envoy Gateway's chart wraps each CRD in a Helm `{{- if ... }}` line.
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("{{")]
    return [d for d in yaml.safe_load_all("\n".join(lines)) if d and d.get("kind") == "CustomResourceDefinition"]


def resource_schema(crd: dict, version: dict, source: dict) -> dict:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema = convert(version["schema"]["openAPIV3Schema"])
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": f"{group}/{version['name']}"}
    props["kind"] = {"const": kind}
    props["metadata"] = OBJECT_META
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    schema["additionalProperties"] = False
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{kind} {group}/{version['name']}",
            "$comment": (f"Generated by tests/schemas/crd2schema.py from {source['repo']} {source['tag']} "
                         f"(commit {source['commit']}) {source['path']}; do not edit."),
            **schema}


def read_source(repo: str, tag: str, path: str, clones: dict[str, str]) -> tuple[str, str]:
    """(file text, commit) of path at tag."""
    if repo in clones:
        git = ["git", "-C", clones[repo]]
        commit = subprocess.run([*git, "rev-parse", f"{tag}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
        text = subprocess.run([*git, "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
        return text, commit
    with urllib.request.urlopen(f"https://api.github.com/repos/{repo}/commits/{tag}", timeout=30) as r:
        commit = json.load(r)["sha"]
    with urllib.request.urlopen(f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", timeout=60) as r:
        return r.read().decode(), commit


def write_readme_table(readme: Path, sources: list[dict]) -> None:
    """Replace the table between the two markers of the README with the sources."""
    start, end = "<!-- crd2schema: sources -->", "<!-- /crd2schema -->"
    text = readme.read_text()
    rows = [f"| `crd/{s['schema']}` | {s['kind']} `{s['version']}` | [{s['repo']}](https://github.com/{s['repo']}) "
            f"| `{s['tag']}` (`{s['commit'][:12]}`) | `{s['path']}` |" for s in sources]
    table = "\n".join(["| Schema | Kind | Repository | Tag (commit) | CRD file |", "|---|---|---|---|---|", *rows])
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--git", action="append", default=[], metavar="OWNER/NAME=DIR",
                    help="read that repository from a local clone (a bare git dir works) instead of GitHub")
    ap.add_argument("--only", action="append", default=[], metavar="KIND",
                    help="regenerate only the sources holding this kind; the other rows of SOURCES.json are kept")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    clones = dict(g.split("=", 1) for g in args.git)
    args.out.mkdir(parents=True, exist_ok=True)
    kept = json.loads((args.out / "SOURCES.json").read_text()) if args.only else []
    sources = []
    for repo, tag, path, keep in SOURCES:
        if args.only and not set(args.only) & set(keep):
            sources += [s for s in kept if (s["repo"], s["path"]) == (repo, path)]
            continue
        text, commit = read_source(repo, tag, path, clones)
        source = {"repo": repo, "tag": tag, "commit": commit, "path": path}
        found = set()
        for crd in crd_documents(text):
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version["name"] not in keep.get(kind, []):
                    continue
                name = f"{crd['spec']['group']}_{kind.lower()}_{version['name']}.json"
                (args.out / name).write_text(json.dumps(resource_schema(crd, version, source), indent=1,
                                                        sort_keys=True) + "\n")
                found.add((kind, version["name"]))
                sources.append({**source, "kind": kind, "version": version["name"], "schema": name})
        missing = {(k, v) for k, vs in keep.items() for v in vs} - found
        if missing:
            print(f"{repo} {tag} {path}: not found: {sorted(missing)}", file=sys.stderr)
            return 1
    (args.out / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    write_readme_table(args.out.parent / "README.md", sources)
    print(f"wrote {len(sources)} schemas to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
