"""The three kustomize features the rendered tree uses (resources, images, JSON 6902 patches), applied without a
kustomize binary, so the tests can check that an overlay builds to what rendering its config directly gives."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ralign.ops.k8s.render import KUSTOMIZE_API, ManifestError



def load_yaml_docs(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {exc}") from None


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_json_patch(doc: Any, ops: list[dict], source: str = "patch") -> Any:
    """RFC 6902 add / remove / replace / test on a copy of `doc` (the operations kustomize's patches use here)."""
    doc = copy.deepcopy(doc)
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or op.get("op") not in ("add", "remove", "replace", "test") or "path" not in op:
            raise ManifestError(f"{source}: operation {n}: expected op add/remove/replace/test with a path, got {op!r}")
        parts = [_unescape(t) for t in op["path"].split("/")[1:]]
        if not parts:
            raise ManifestError(f"{source}: operation {n}: the whole document cannot be patched")
        parent = doc
        for t in parts[:-1]:
            try:
                parent = parent[int(t)] if isinstance(parent, list) else parent[t]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ManifestError(f"{source}: operation {n} ({op['op']} {op['path']}): no such path") from None
        last = parts[-1]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last) if last.isdigit() else -1
            if not 0 <= idx <= len(parent) - (0 if op["op"] == "add" else 1):
                raise ManifestError(f"{source}: operation {n} ({op['op']} {op['path']}): index out of range")
        elif not isinstance(parent, dict) or (op["op"] != "add" and last not in parent):
            raise ManifestError(f"{source}: operation {n} ({op['op']} {op['path']}): no such path")
        else:
            idx = last
        if op["op"] == "test":
            if parent[idx] != op.get("value"):
                raise ManifestError(f"{source}: operation {n}: test of {op['path']} failed: {parent[idx]!r} != {op.get('value')!r}")
        elif op["op"] == "remove":
            del parent[idx]
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(idx, copy.deepcopy(op["value"]))
        else:
            parent[idx] = copy.deepcopy(op["value"])
    return doc


def _set_images(node: Any, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _new_image(image: str, images: list[dict]) -> str:
    name, tag = (image.rsplit(":", 1) + [""])[:2] if ":" in image.rsplit("/", 1)[-1] else (image, "")
    for rule in images:
        if rule.get("name") == name:
            name = rule.get("newName", name)
            tag = str(rule.get("newTag", tag))
            return f"{name}:{tag}" if tag else name
    return image


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


def build_kustomization(directory: str | Path) -> list[dict]:
    """What `kustomize build DIR` gives for the features this tree uses: resources (files and directories), images
    (name -> newName/newTag on every container) and patches (JSON 6902 files with a kind/name target). Anything else
    is refused rather than silently ignored: there is no kustomize binary in CI to fall back on."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise ManifestError(f"{directory}: no kustomization.yaml")
    docs = load_yaml_docs(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ManifestError(f"{kfile}: expected one mapping")
    k = docs[0]
    unknown = sorted(set(k) - KUSTOMIZATION_KEYS)
    if unknown:
        raise ManifestError(f"{kfile}: fields {unknown} are not supported by ralign's kustomize check (supported: {sorted(KUSTOMIZATION_KEYS)})")
    if k.get("kind", "Kustomization") != "Kustomization" or k.get("apiVersion", KUSTOMIZE_API) != KUSTOMIZE_API:
        raise ManifestError(f"{kfile}: expected apiVersion {KUSTOMIZE_API}, kind Kustomization")
    out: list[dict] = []
    for res in k.get("resources") or []:
        path = directory / res
        if path.is_dir():
            out += build_kustomization(path)
        elif path.is_file():
            out += [d for d in load_yaml_docs(path)]
        else:
            raise ManifestError(f"{kfile}: resource {res!r} does not exist")
    _set_images(out, k.get("images") or [])
    for n, patch in enumerate(k.get("patches") or []):
        target = patch.get("target") or {}
        if "path" not in patch or not {"kind", "name"} <= set(target):
            raise ManifestError(f"{kfile}: patches[{n}]: expected a path and a target with kind and name")
        ppath = directory / patch["path"]
        if not ppath.is_file():
            raise ManifestError(f"{kfile}: patches[{n}]: patch file {patch['path']!r} does not exist")
        ops = load_yaml_docs(ppath)
        ops = ops[0] if len(ops) == 1 else ops
        if not isinstance(ops, list):
            raise ManifestError(f"{ppath}: expected a list of JSON 6902 operations")
        hits = [i for i, d in enumerate(out) if d.get("kind") == target["kind"] and d.get("metadata", {}).get("name") == target["name"]
                and ("group" not in target or d.get("apiVersion", "").split("/")[0] == target["group"])]
        if not hits:
            raise ManifestError(f"{kfile}: patches[{n}]: no {target['kind']} named {target['name']!r} among the resources")
        for i in hits:
            out[i] = apply_json_patch(out[i], ops, source=str(ppath))
    return out
