"""`ralign export`: a trained checkpoint in the layouts other tools read.

- `lora`: `pytorch_lora_weights.safetensors` in the layout diffusers' `load_lora_weights` reads, written by diffusers'
  own `save_lora_weights` from peft's state dict of the adapters (`get_peft_model_state_dict` +
  `convert_state_dict_to_diffusers`, no hand-written key map), with the adapters' rank and alpha as metadata; plus a
  README.md model card (base model, algorithm, reward, policy settings, the run's oracle figures).
- `pipeline`: a complete diffusers `StableDiffusionPipeline` directory (`save_pretrained`) that `from_pretrained`
  loads: the base model with the LoRA fused in by diffusers (`load_lora_weights` + `fuse_lora`), and a tuned text
  encoder (TextCraftor) in place of the original one. Needed whenever the text encoder was tuned.

What a stock pipeline cannot express is said in one line and the export writes what it can: LongAlign's segment
encoding (a stock pipeline encodes one 77-token window; the LoRA is still written, the user must feed segment
embeddings as `prompt_embeds`), and TextCraftor's interpolation at a weight other than 1 (a stock pipeline has one
text encoder; the exported one interpolates the encoders' weights, which is close to, not the same as, interpolating
their embeddings; the largest difference on a few prompts is measured and reported).
Everything is written to a temporary directory beside `--out` and moved into place at the end: a refused or failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ralign.config import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("lora", "pipeline")
PROBE_PROMPTS = ("a red circle", "two blue squares", "a green triangle to the left of a yellow circle")


def check_out_dir(out: Path) -> None:
    """Refuse an --out that holds anything: exports and soups never overwrite other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory (ralign never overwrites other files there)")


def _lora_layers(module, convert: bool) -> dict | None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(module, "_hf_peft_config_loaded", False):  # diffusers' / transformers' mark of a peft adapter
        return None
    state = get_peft_model_state_dict(module)
    return convert_state_dict_to_diffusers(state) if convert else state


def _metadata(module) -> dict:
    cfg = module.peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}


def write_lora(policy, directory: Path) -> list[str]:
    """The policy's LoRA adapters (UNet or flow transformer, and the text encoder when it has a LoRA), written by its
    diffusers pipeline class's own `save_lora_weights`."""
    layers = {name: (_lora_layers(module, policy.lora_keys_in_diffusers_format), module) for name, module in policy.lora_modules().items()}
    layers = {name: (state, module) for name, (state, module) in layers.items() if state is not None}
    if not layers:
        return []
    policy.pipeline_class.save_lora_weights(
        str(directory), safe_serialization=True,
        **{f"{name}_lora_layers": state for name, (state, _) in layers.items()},
        **{f"{name}_lora_adapter_metadata": _metadata(module) for name, (_, module) in layers.items()},
    )
    return [LORA_FILE]


def _base_pipeline(spec: dict):
    from ralign.diffusion.policy import base_pipeline

    pipe = base_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_pipeline(policy, spec: dict, lora_dir: Path | None, directory: Path) -> tuple[list[str], list[str]]:
    """A stock pipeline with the checkpoint's weights in it; returns (files, notes)."""
    notes = []
    pipe = _base_pipeline(spec)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if policy.cfg.text_encoder == "full":
        w = policy.cfg.text_encoder_weight
        tuned = dict(policy.text_encoder.state_dict())
        if w != 1.0:
            original = policy.original_text_encoder.state_dict()
            tuned = {k: w * v + (1 - w) * original[k] if v.is_floating_point() else v for k, v in tuned.items()}
        pipe.text_encoder.load_state_dict(tuned)
        if w != 1.0:
            notes.append(f"text_encoder_weight={w}: a stock pipeline has one text encoder, so the exported one "
                         f"interpolates the encoders' weights; its embeddings differ from ralign's interpolated embeddings "
                         f"by at most {_embedding_gap(policy, pipe):.3g} on {len(PROBE_PROMPTS)} probe prompts")
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()), notes


@torch.no_grad()
def _embedding_gap(policy, pipe) -> float:
    ids = pipe.tokenizer(list(PROBE_PROMPTS), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    exported = pipe.text_encoder(ids)[0]
    ours, _ = policy.encode(list(PROBE_PROMPTS))
    return float((exported - ours).abs().max())


def run_oracle_figures(record: dict, tracking_uri: str | None) -> dict | None:
    """The run's before/after oracle figures, when its MLflow run can be read."""
    run_id = record.get("run_id")
    if not run_id:
        return None
    try:
        from ralign.ops.tracking import resolve_tracking_uri, tracking_client

        client = tracking_client(resolve_tracking_uri(tracking_uri))
        figures = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("oracle_change", "oracle_after"):
                try:
                    figures[name] = json.loads(Path(client.download_artifacts(run_id, f"{name}.json", tmp)).read_text())
                except Exception:  # noqa: BLE001 - an older run, or no evaluation
                    pass
        return figures or None
    except Exception:  # noqa: BLE001 - the store is elsewhere: the card says the figures are not available
        return None


def model_card(ref: str, record: dict, fmt: str, files: list[str], notes: list[str], figures: dict | None) -> str:
    spec = record.get("policy_spec", {})
    policy = spec.get("policy", {})
    trained = record.get("trained_with") or {}
    lines = [f"# ralign export of {ref}", "",
             f"- Base model: `{spec.get('pipeline')}`",
             f"- Algorithm / reward: {trained.get('algorithm', '?')} / {trained.get('reward', '?')} (MLflow run {record.get('run_id', '?')})",
             f"- Iterations: {record.get('iteration')}, policy version {record.get('version')}",
             "- Policy: " + ", ".join(f"{k}={policy[k]}" for k in sorted(policy)),
             f"- Format: `{fmt}` ({', '.join(files[:8])}{' ...' if len(files) > 8 else ''})", ""]
    if fmt == "lora":
        lines += ["```python", "from diffusers import StableDiffusionPipeline",
                  f"pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL)  # {spec.get('pipeline')}",
                  f"pipe.load_lora_weights(EXPORT_DIR, weight_name='{LORA_FILE}')", "```", ""]
    else:
        lines += ["```python", "from diffusers import StableDiffusionPipeline",
                  "pipe = StableDiffusionPipeline.from_pretrained(EXPORT_DIR)", "```", ""]
    lines += [f"Sampling as trained: {policy.get('steps')} DDIM steps, guidance {policy.get('guidance')}.", ""]
    change = (figures or {}).get("oracle_change")
    if change:
        o = change["overall"]
        lines += ["Held-out oracle all-correct before → after training (same prompts and noise, paired 95% interval):", "",
                  "| family | before | after | change [95%] | n |", "|---|---|---|---|---|"]
        for fam, c in [*change["families"].items(), ("overall", o)]:
            lines.append(f"| {fam} | {c['before']:.3f} | {c['after']:.3f} | {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['n']} |")
        lines.append("")
    else:
        lines += ["The run's oracle figures are not available here (its MLflow store was not reachable, or it was not "
                  "evaluated before and after).", ""]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def export_checkpoint(ref: str, out: str | Path, fmt: str = "lora", tracking_uri: str | None = None) -> dict:
    """Export checkpoint `ref` (a directory, runs:/ or models:/ URI) to `out`; returns {format, out, files, notes}."""
    from ralign.diffusion.policy import policy_from_checkpoint
    from ralign.models.weights import read_json
    from ralign.ops.checkpoint_refs import local_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    out = Path(out)
    check_out_dir(out)
    with local_checkpoint(ref, tracking_uri) as local:
        policy = policy_from_checkpoint(local, source=ref)  # every file checked first: a bad one is one line
        record = read_json(Path(local) / "learner_state.json", f"{ref}/learner_state.json")
    spec = record.get("policy_spec") or {}
    notes = []
    if fmt == "lora" and policy.cfg.text_encoder == "full":
        raise UserError(f"{ref} tunes the whole text encoder (TextCraftor), which a LoRA file cannot hold: use --format pipeline")
    if policy.cfg.text_encoding == "segment":
        notes.append("this model was trained with LongAlign's segment encoding, which a stock pipeline does not do: feed "
                     "it the concatenated per-sentence embeddings as prompt_embeds (ralign/diffusion/text_encoding.py "
                     "SegmentEncoder), or expect it to read only the first 77-token window of a long prompt")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lora_dir = staging / "lora"
        lora_dir.mkdir()
        lora_files = write_lora(policy, lora_dir)
        if fmt == "lora":
            if not lora_files:
                raise UserError(f"{ref} has no LoRA adapters to export (nothing was trained through LoRA)")
            target, files = lora_dir, lora_files
        else:
            target = staging / "pipeline"
            target.mkdir()
            files, more = write_pipeline(policy, spec, lora_dir if lora_files else None, target)
            notes += more
        (target / "README.md").write_text(model_card(ref, record, fmt, files, notes, run_oracle_figures(record, tracking_uri)),
                                          encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        target.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"format": fmt, "out": str(out), "files": files + ["README.md"], "notes": notes}
