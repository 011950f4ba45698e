"""`ralign soup`: one checkpoint whose change to the base model is the weighted average of several checkpoints'
changes (model soups, Wortsman et al. 2022; rewarded soups, Ramé et al. 2023, for RL runs on different rewards).

Runs of one recipe that differ only in their seed each carry their own share of noise; averaging their weight changes
keeps what they agree on. The checkpoints must share the base model and every policy setting but the adapters' ranks.

The average is exact, not an average of LoRA factors (runs with different seeds start from different factors, and
the mean of products is not the product of means): the soup's adapter concatenates the runs' adapters, rank by rank,
each scaled by its weight and its own alpha/rank, so that B'A' = sum_i w_i (alpha_i / r_i) B_i A_i, with alpha' = r'.
peft has `add_weighted_adapter(combination_type="cat")` for this on a live model; done here on the checkpoint files
instead, so that souping needs neither the base model in memory nor a policy per run. Tensors trained in full (a
TextCraftor text encoder) are averaged directly, which is the same average of changes.

A soup averages whatever its runs learnt, reward hacking included (measured: one of the main job's five seeds lost
counting −0.13 while its reward rose, and the soup of all five lost counting against the soup of the first three,
benchmarks/results/soups.md). So each source's run is looked up in the tracking store and a run `ralign train` tagged
for reward hacking is refused unless asked for (`allow_flagged`); runs the store does not hold are reported unchecked.

The soup is written to a temporary directory beside `--out` and moved into place at the end, in the checkpoint layout
`ralign eval`, `generate` and `export` read. It records its sources and weights (`souped_from`); it is not a training
state to resume.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ralign.config import UserError

# Policy settings that may differ between the runs of a soup: the soup's own ranks are the sums of theirs.
RANK_SETTINGS = ("unet_lora_rank", "unet_lora_alpha", "text_lora_rank")
LORA_A, LORA_B = ".lora_A.", ".lora_B."


def _lora_scale(key: str, policy: dict) -> float:
    """alpha / rank of the adapter a LoRA tensor belongs to (the policy builds text-encoder adapters with alpha = rank)."""
    if key.startswith("text_encoder."):
        return 1.0
    rank = policy["unet_lora_rank"]
    return (policy.get("unet_lora_alpha") or rank) / rank


def _read(ref: str, tracking_uri: str | None) -> dict:
    from ralign.diffusion.policy import read_checkpoint
    from ralign.ops.checkpoint_refs import local_checkpoint

    with local_checkpoint(ref, tracking_uri) as local:  # an MLflow URI is downloaded to a temporary dir
        record, _, tensors = read_checkpoint(local, source=str(ref))
    return {"ref": str(ref), "record": record, "tensors": tensors}


def _check_compatible(runs: list[dict]) -> None:
    first = runs[0]
    spec0 = first["record"]["policy_spec"]
    for run in runs[1:]:
        spec = run["record"]["policy_spec"]
        if spec.get("pipeline") != spec0.get("pipeline"):
            raise UserError(f"{run['ref']} was trained on {spec.get('pipeline')!r}, {first['ref']} on {spec0.get('pipeline')!r}: "
                            "a soup averages changes to one base model")
        p0, p = spec0.get("policy", {}), spec.get("policy", {})
        differ = sorted(k for k in set(p0) | set(p) if k not in RANK_SETTINGS and p0.get(k) != p.get(k))
        if differ:
            raise UserError(f"{run['ref']} and {first['ref']} differ in policy setting(s) {differ}: only the adapters' ranks may differ")
        keys, keys0 = set(run["tensors"]), set(first["tensors"])
        if keys != keys0:
            odd = sorted(keys ^ keys0)
            raise UserError(f"{run['ref']} and {first['ref']} train different tensors (e.g. {odd[0]}); a soup needs the same adapters")
        for k, v in run["tensors"].items():
            if LORA_A not in k and LORA_B not in k and v.shape != first["tensors"][k].shape:
                raise UserError(f"{run['ref']}: {k} has shape {tuple(v.shape)}, {first['ref']} {tuple(first['tensors'][k].shape)}")


def reward_hacking_flags(runs: list[dict], tracking_uri: str | None) -> dict[str, list[str] | None]:
    """For each source, the families its run was flagged for (against its start or the pretrained model; [] = checked
    and clean), or None when the tracking store does not hold its run (or there is no store to ask)."""
    from ralign.ops.tracking import REWARD_HACKING_TAG, VS_PRETRAINED, TrackingError, resolve_tracking_uri, tracking_client

    hacking_tags = (REWARD_HACKING_TAG, REWARD_HACKING_TAG + VS_PRETRAINED)
    flags: dict[str, list[str] | None] = {run["ref"]: None for run in runs}
    try:
        client = tracking_client(resolve_tracking_uri(tracking_uri))
    except TrackingError:
        return flags
    for run in runs:
        run_id = run["record"].get("run_id")
        if not run_id:
            continue
        try:
            tags = client.get_run(run_id).data.tags
        except Exception:  # not in this store (MlflowException), or the store cannot be read: unchecked, not fatal
            continue
        if not any(t in tags for t in hacking_tags):
            continue  # a run still going or interrupted: no verdict yet
        flags[run["ref"]] = sorted({f for t in hacking_tags for f in tags.get(t, "none").split(",") if f and f != "none"})
    return flags


def _normalised(weights: Sequence[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise UserError(f"--weights has {len(weights)} value(s) for {k} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights {list(weights)}: each must be finite and >= 0, and their sum > 0")
    return [w / sum(weights) for w in weights]


def merge_trainable_states(states: Sequence[dict[str, torch.Tensor]], policies: Sequence[dict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The trainable tensors of the soup: LoRA factors concatenated (A scaled by weight x alpha/rank, so the soup's
    adapter has scale 1), every other tensor the weighted mean."""
    merged = {}
    for key in states[0]:
        if LORA_A in key:
            merged[key] = torch.cat([w * _lora_scale(key, p) * s[key].float() for s, p, w in zip(states, policies, weights)], dim=0)
        elif LORA_B in key:
            merged[key] = torch.cat([s[key].float() for s in states], dim=1)
        else:
            merged[key] = sum(w * s[key].float() for s, w in zip(states, weights))
    return {k: v.contiguous() for k, v in merged.items()}


def soup_checkpoints(refs: Sequence[str], out: str | Path, weights: Sequence[float] | None = None,
                     tracking_uri: str | None = None, allow_flagged: bool = False) -> dict:
    """Write the soup of `refs` (checkpoint directories, runs:/ or models:/ URIs) to `out`; returns what was written.
    A source whose run was flagged for reward hacking is refused unless `allow_flagged`."""
    from safetensors.torch import save_file

    from ralign.ops.export import check_out_dir

    out = Path(out)
    if len(refs) < 2:
        raise UserError(f"a soup needs at least 2 checkpoints, got {len(refs)}")
    check_out_dir(out)
    w = _normalised(weights, len(refs))
    runs = [_read(ref, tracking_uri) for ref in refs]
    _check_compatible(runs)
    flags = reward_hacking_flags(runs, tracking_uri)
    flagged = {ref: fams for ref, fams in flags.items() if fams}
    if flagged and not allow_flagged:
        run_ids = {run["ref"]: run["record"].get("run_id") for run in runs}
        named = "; ".join(f"{ref} (run {run_ids[ref]}: {', '.join(fams)})" for ref, fams in flagged.items())
        raise UserError(f"flagged for reward hacking (training reward rose while held-out all-correct fell): {named}; "
                        "a soup would average that in: leave it out, or pass --allow-flagged")
    policies = [run["record"]["policy_spec"].get("policy", {}) for run in runs]
    merged = merge_trainable_states([run["tensors"] for run in runs], policies, w)

    spec = json.loads(json.dumps(runs[0]["record"]["policy_spec"]))
    policy = spec.setdefault("policy", {})
    if any(k.startswith("text_encoder.") and LORA_A in k for k in merged):
        policy["text_lora_rank"] = sum(p.get("text_lora_rank", 8) for p in policies)
    if any(not k.startswith("text_encoder.") and LORA_A in k for k in merged):
        policy["unet_lora_rank"] = sum(p["unet_lora_rank"] for p in policies)
        policy["unet_lora_alpha"] = float(policy["unet_lora_rank"])
    spec["init_checkpoint"] = None  # the runs' tensors already include the stage they started from
    record = {"iteration": 0, "version": 0, "policy_spec": spec,
              "souped_from": [{"checkpoint": run["ref"], "weight": round(wi, 6), "run_id": run["record"].get("run_id"),
                               "iteration": run["record"].get("iteration"), "trained_with": run["record"].get("trained_with"),
                               "reward_hacking": flags[run["ref"]] if flags[run["ref"]] is not None else "unchecked"}
                              for run, wi in zip(runs, w)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(merged, str(staging / "trainable.safetensors"))
        (staging / "learner_state.json").write_text(json.dumps(record, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), "weights": w, "policy": {k: policy.get(k) for k in RANK_SETTINGS}, "tensors": len(merged),
            "flagged": flagged, "unchecked": [ref for ref, fams in flags.items() if fams is None]}
