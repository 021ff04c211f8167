#!/usr/bin/env python3
"""Kubernetes JSON schemas for kubeconform, from the kubernetes-validate
wheel (PyPI), which carries them for every Kubernetes minor it supports.

Its schemas point into one shared `/api/_definitions.json#/$defs/`; kubeconform
wants one self-contained file per kind. This writes, for each kind of the
chosen version, the kind's schema with the definitions it reaches (and only
those) under its own `$defs`, its references rewritten to `#/$defs/...`:
the layout kubeconform's `-schema-location` template expects,

    OUT/v1.30.0-standalone-strict/deployment-apps-v1.json

usage: k8s-schemas.py WHEEL VERSION OUT   (VERSION like v1.30.0)
"""
import json
import os
import sys
import zipfile

# How the kind files point into the definitions, and how the definitions
# point at each other.
PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def target(r):
    if isinstance(r, str):
        for p in PREFIXES:
            if r.startswith(p):
                return r[len(p):]
    return None


def refs(node, out):
    if isinstance(node, dict):
        t = target(node.get("$ref"))
        if t is not None:
            out.add(t)
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def rewrite(node):
    if isinstance(node, dict):
        return {k: ("#/$defs/" + target(v) if k == "$ref" and target(v) is not None else rewrite(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite(v) for v in node]
    return node


def main():
    wheel, version, out = sys.argv[1:4]
    base = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/"
    z = zipfile.ZipFile(wheel)
    names = [n for n in z.namelist() if n.startswith(base) and n.endswith(".json")]
    if not names:
        sys.exit(f"{wheel} has no schemas for {version} (under {base})")
    defs = json.loads(z.read(base + "_definitions.json"))["$defs"]
    dest = os.path.join(out, f"{version}-standalone-strict")
    os.makedirs(dest, exist_ok=True)
    count = 0
    for n in names:
        file = n[len(base):]
        if file.startswith("_") or "/" in file:
            continue
        schema = json.loads(z.read(n))
        # Only kinds (objects with apiVersion and kind) are looked up.
        if "kind" not in schema.get("properties", {}):
            continue
        need, todo = set(), set()
        refs(schema, todo)
        while todo:
            d = todo.pop()
            if d in need:
                continue
            need.add(d)
            if d not in defs:
                sys.exit(f"{n}: reference to {d}, missing from _definitions.json")
            refs(defs[d], todo)
        schema = rewrite(schema)
        schema["$defs"] = {d: rewrite(defs[d]) for d in sorted(need)}
        with open(os.path.join(dest, file), "w") as f:
            json.dump(schema, f)
        count += 1
    print(f"{count} kinds of Kubernetes {version} in {dest}")


if __name__ == "__main__":
    main()
