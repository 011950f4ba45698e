"""The `ralign` command line. Each verb is a thin wrapper over a library function. Errors a user can fix (a config, an
input, a path, a checkpoint: `ralign.config.UserError` and its kinds) are printed as one line (`error: ...`) with
exit code 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ralign.config import UserError
from ralign.models import TOY_MODELS_DIR

app = typer.Typer(help="Ray-distributed RL alignment of text-to-image diffusion models.", no_args_is_help=True, pretty_exceptions_enable=False)
world_app = typer.Typer(help="The toy world: renderer, oracle, pretraining of the toy models.", no_args_is_help=True)
app.add_typer(world_app, name="world")
k8s_app = typer.Typer(help="KubeRay manifests (RayJob for training, RayService for the reward servers): render, validate.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Library chatter (diffusers/transformers deprecation notes) drowns progress lines; keep warnings and up.
    for noisy in ("diffusers", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _emit_json(data: dict, out: Optional[Path]) -> None:
    text = json.dumps(data, indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {out}")


@world_app.command("render")
def world_render(
    family: Annotated[str, typer.Option(help="Prompt family: single, binding, counting, spatial, size, long.")],
    n: Annotated[int, typer.Option(min=1, help="Number of prompts / images.")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs + prompts.jsonl).")] = Path("outputs/render"),
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "train",
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Render clean scenes of N prompts of one family: one PNG each and a prompts.jsonl index."""
    from PIL import Image

    from ralign.world.prompts import generate
    from ralign.world.scene import render

    samples = generate(family, n, split=split, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "prompts.jsonl").open("w", encoding="utf-8") as index:
        for i, s in enumerate(samples):
            name = f"{family}_{i:05d}.png"
            Image.fromarray(render(s.scene)).save(out / name)
            index.write(json.dumps({"image": name, "prompt": s.prompt, "family": family, "split": split, "unseen": s.unseen}) + "\n")
    typer.echo(f"wrote {n} images and prompts.jsonl to {out}")


@world_app.command("oracle-check")
def world_oracle_check(
    n: Annotated[int, typer.Option(min=1, help="Prompts per family.")] = 200,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics JSON here (default: stdout).")] = None,
    split: Annotated[str, typer.Option(help="Split of the prompts.")] = "test",
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Run the oracle on clean renders of every family; all_correct should be ~1.0 everywhere."""
    from ralign.world.oracle import oracle_check

    _emit_json(oracle_check(n, seed=seed, split=split), json_out)


@world_app.command("pretrain")
def world_pretrain(
    out: Annotated[Path, typer.Option(help="Where the toy models go.")] = TOY_MODELS_DIR,
    only: Annotated[str, typer.Option(help="Comma list of: t2i, reward_clip, preference, captioner, segmenter, detector, flow.")] = "t2i,reward_clip,preference,captioner,segmenter,detector,flow",
    scale: Annotated[float, typer.Option(min=0.001, help="Multiply every step count (e.g. 0.01 for a smoke run).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    unet_init: Annotated[Optional[str], typer.Option(help="Start the UNet from this diffusers UNet dir instead of a random init.")] = None,
    continue_unet: Annotated[int, typer.Option(min=0, help="With t2i: train the UNet of OUT/base for this many more steps, keeping its text encoder and VAE.")] = 0,
    unet_lr: Annotated[Optional[float], typer.Option(help="UNet learning rate (default: the pretraining config's).")] = None,
    continue_reward_clip: Annotated[int, typer.Option(min=0, help="With reward_clip: train the reward CLIP of OUT/reward_clip for this many more steps (near misses, generated look).")] = 0,
    reward_clip_lr: Annotated[Optional[float], typer.Option(help="Reward CLIP learning rate (default 5e-4).")] = None,
    continue_preference: Annotated[int, typer.Option(min=0, help="With preference: train the preference model of OUT/preference for this many more steps.")] = 0,
    preference_near_misses: Annotated[float, typer.Option(min=0.0, max=1.0, help="With preference: fraction of rejected images that are near misses of the prompt's scene (all images then get the generated look).")] = 0.0,
    preference_lr: Annotated[Optional[float], typer.Option(help="Preference model learning rate (default 2e-4).")] = None,
    continue_captioner: Annotated[int, typer.Option(min=0, help="With captioner: train the captioner of OUT/captioner for this many more steps.")] = 0,
    captioner_near_misses: Annotated[int, typer.Option(min=0, help="With captioner: near misses per image, ranked below the image by the caption reward (0: likelihood only).")] = 0,
    captioner_lr: Annotated[Optional[float], typer.Option(help="Captioner learning rate (default 5e-4).")] = None,
    continue_segmenter: Annotated[int, typer.Option(min=0, help="With segmenter: train the segmenter of OUT/segmenter for this many more steps.")] = 0,
    segmenter_shared_absent: Annotated[float, typer.Option(min=0.0, max=1.0, help="With segmenter: fraction of absent phrases that share the colour of a present object.")] = 0.0,
    segmenter_look: Annotated[bool, typer.Option(help="With segmenter: give the training images the base model's generated look.")] = False,
    segmenter_lr: Annotated[Optional[float], typer.Option(help="Segmenter learning rate (default 1e-3).")] = None,
    continue_detector: Annotated[int, typer.Option(min=0, help="With detector: train the detector of OUT/detector for this many more steps.")] = 0,
    detector_deform: Annotated[float, typer.Option(min=0.0, max=1.0, help="With detector: fraction of circles and squares drawn as in-between rounded squares, labelled by the shape they overlap most.")] = 0.0,
    detector_lr: Annotated[Optional[float], typer.Option(help="Detector learning rate (default 3e-4).")] = None,
    detector_stride: Annotated[Optional[int], typer.Option(help="With detector: backbone feature stride, 8 (an 8x8 map, the shipped one) or 4 (16x16); with --continue-detector, the earlier detector rebuilt with it, shared tensors kept.")] = None,
    flow_steps: Annotated[Optional[int], typer.Option(min=1, help="With flow: training steps of the flow transformer (default 6000, times --scale).")] = None,
    continue_flow: Annotated[bool, typer.Option(help="With flow: continue from the transformer in OUT/flow instead of a random init.")] = False,
) -> None:
    """Train the toy models from scratch on renders of the toy world (the committed ones were made by this)."""
    _setup_logging()
    from ralign.pretrain.run import pretrain_all

    def given(**options) -> dict:  # an option left at its default changes nothing
        return {k: v for k, v in options.items() if v is not None}

    if detector_stride is not None:
        from ralign.models.detector import FEATURE_STRIDES

        if detector_stride not in FEATURE_STRIDES:
            raise typer.BadParameter(f"must be one of {FEATURE_STRIDES}, got {detector_stride}", param_hint="--detector-stride")
    overrides = {
        "t2i": given(unet_init=unet_init, continue_steps=continue_unet or None, unet_lr=unet_lr),
        "reward_clip": given(continue_steps=continue_reward_clip or None, lr=reward_clip_lr),
        "preference": given(continue_steps=continue_preference or None, near_miss_fraction=preference_near_misses or None,
                            lr=preference_lr),
        "captioner": given(continue_steps=continue_captioner or None, near_misses_per_image=captioner_near_misses or None,
                           lr=captioner_lr),
        "segmenter": given(continue_steps=continue_segmenter or None, shared_absent=segmenter_shared_absent or None,
                           generated_look=segmenter_look or None, lr=segmenter_lr),
        "detector": given(continue_steps=continue_detector or None, deform_fraction=detector_deform or None, lr=detector_lr,
                          feature_stride=detector_stride),
        "flow": given(steps=flow_steps, init=str(out / "flow" / "transformer") if continue_flow else None),
    }
    results = pretrain_all(out, [p.strip() for p in only.split(",") if p.strip()], scale=scale, seed=seed,
                           overrides={part: o for part, o in overrides.items() if o})
    typer.echo(json.dumps(results, indent=2))


@app.command("eval")
def evaluate(
    pipeline: Annotated[str, typer.Option(help="'base' (committed toy model), a diffusers directory, or a hub id.")] = "base",
    checkpoint: Annotated[Optional[str], typer.Option(help="Evaluate a trained checkpoint instead: a directory, runs:/RUN_ID/checkpoint, models:/NAME@ALIAS or models:/NAME/VERSION (its base model and policy settings come with it).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for runs:/ and models:/ (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Prompt split: train, val, test (default: test, or --against's).")] = None,
    n: Annotated[Optional[int], typer.Option(min=1, help="Prompts per family (default: 200, or --against's).")] = None,
    against: Annotated[Optional[Path], typer.Option(help="Compare, paired, with this earlier evaluation of the same prompts and noise: a `ralign eval --json` report, or a `ralign train --json` summary (its before-training evaluation). Its split, n, seed and families are used.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics JSON here (default: stdout).")] = None,
    grids: Annotated[Optional[Path], typer.Option(help="Directory for per-family image grids (default: beside --json).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sampling steps (DDIM, or the flow ODE; default: the checkpoint's evaluation steps, else 20).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the checkpoint's, else 3, which suits the toy base model best).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 64,
    seed: Annotated[Optional[int], typer.Option(help="Seed of prompts and noise (default: 0, or --against's).")] = None,
    families: Annotated[Optional[str], typer.Option(help="Comma list of families (default: all, or --against's).")] = None,
) -> None:
    """Generate images for held-out prompts, score them with the oracle, write per-family metrics (with 95 %
    intervals over prompts) and image grids; with --against, also the paired change from an earlier evaluation
    (e.g. a run's before-training one, to see where an intermediate checkpoint stood)."""
    from ralign.world.prompts import FAMILIES, SPLITS

    fams = None if families is None else [f.strip() for f in families.split(",") if f.strip()]
    earlier = None
    if against is not None:
        earlier = earlier_evaluation(against)
        given = {"split": split, "n": n, "seed": seed, "families": fams}
        fixed = {"split": earlier["split"], "n": earlier["n_per_family"], "seed": earlier["seed"],
                 "families": list(earlier["per_prompt"])}
        clash = [f"--{k} {given[k]} (it has {fixed[k]})" for k in given if given[k] is not None and given[k] != fixed[k]]
        if clash:
            raise UserError(f"--against {against} fixes the prompts and noise; drop or change {', '.join(clash)}")
        split, n, seed, fams = fixed["split"], fixed["n"], fixed["seed"], fixed["families"]
    split = "test" if split is None else split
    n = 200 if n is None else n
    seed = 0 if seed is None else seed
    fams = list(FAMILIES) if fams is None else fams
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise UserError(f"unknown famil{'y' if len(bad) == 1 else 'ies'} {bad}; expected some of {list(FAMILIES)}")
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {list(SPLITS)}")
    if n * len(fams) < 2:
        raise UserError(f"--n {n} over {len(fams)} family gives one image; the fidelity measure (KID) needs at least 2")
    if tracking_uri is not None:
        from ralign.config import refuse_credentials

        refuse_credentials(tracking_uri, "--tracking-uri")
    _setup_logging()
    from ralign.world.evaluation import evaluate_generator

    # --steps: the evaluation sampler's (deterministic) steps, whatever the checkpoint trained with.
    overrides = {k: v for k, v in (("eval_steps", steps), ("guidance", guidance)) if v is not None}
    from ralign.models import pipeline_family

    if checkpoint is not None or pipeline_family(pipeline) == "flow":
        from ralign.diffusion.policy import build_policy, policy_from_checkpoint
        from ralign.ops.model_registry import local_checkpoint

        if checkpoint is not None:
            with local_checkpoint(checkpoint, tracking_uri) as local:  # an MLflow URI is downloaded to a temporary dir
                policy = policy_from_checkpoint(local, source=checkpoint, **overrides)
        else:  # a flow-matching base model: its own pipeline class, sampled by the flow policy's ODE
            policy = build_policy({"pipeline": pipeline, "policy": {"unet_lora_rank": 0, **overrides}})
        generate = lambda prompts: policy.generate_images(prompts, seed=seed, batch_size=batch_size)  # noqa: E731
        settings = {"checkpoint": checkpoint} if checkpoint is not None else {"pipeline": pipeline}
        settings.update(steps=policy.cfg.eval_steps or policy.cfg.steps, guidance=policy.cfg.guidance)
    else:
        from ralign.models.pipeline import generate_images, load_pipeline

        pipe = load_pipeline(pipeline)
        settings = {"pipeline": pipeline, "steps": overrides.get("steps", 20), "guidance": overrides.get("guidance", 3.0)}
        generate = lambda prompts: generate_images(pipe, prompts, steps=settings["steps"], guidance=settings["guidance"],  # noqa: E731
                                                   seed=seed, batch_size=batch_size)
    grid_dir = grids if grids is not None else (json_out.parent / f"{json_out.stem}_grids" if json_out else Path("outputs/eval_grids"))
    report = evaluate_generator(generate, split=split, n=n, seed=seed, families=fams, grid_dir=grid_dir)
    report.update(settings)
    if earlier is not None:
        from ralign.world.stats import compare_evaluations

        report["change_against"] = {"file": str(against), **compare_evaluations(earlier, report)}
    _emit_json(report, json_out)
    if json_out is not None:
        for fam, m in [*report["families"].items(), ("overall", report["overall"])]:
            lo, hi = m["all_correct_ci"]
            typer.echo(f"  {fam:<8} all-correct {m['all_correct']:.3f} [{lo:.3f}, {hi:.3f}]  n={m['n']}")
    if earlier is not None:
        typer.echo(f"against {against}:")
        typer.echo(describe_change(report["change_against"]))
    typer.echo(f"image grids in {grid_dir}")


def earlier_evaluation(path: Path) -> dict:
    """The evaluation report an `--against` file holds: a `ralign eval --json` report as it is, or the
    before-training evaluation of a `ralign train --json` summary."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--against {path}: cannot read it as JSON ({exc})") from None
    report = data.get("oracle_before", data) if isinstance(data, dict) else None
    if not isinstance(report, dict) or not {"per_prompt", "split", "n_per_family", "seed"} <= set(report):
        raise UserError(f"--against {path}: neither a `ralign eval --json` report nor a `ralign train --json` summary "
                        "with a before-training evaluation (it needs per-prompt verdicts, split, n_per_family and seed)")
    return report


diagnose_app = typer.Typer(help="Diagnoses before training: can a reward drive RL on a family?", no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")


@diagnose_app.command("reward")
def diagnose_reward_command(
    reward: Annotated[Optional[str], typer.Option(help="A registered reward (clip_score, preference, caption, weighted, ...); default: the --config's.")] = None,
    options: Annotated[Optional[str], typer.Option(help="The reward's options as JSON, e.g. '{\"w\": 0.3}' (default: the --config's).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Take the reward and the sampler settings (steps, eta, guidance) from this training config.")] = None,
    deployment: Annotated[Optional[str], typer.Option(help="Score with this running Ray Serve reward application instead (needs --address).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster of --deployment.")] = None,
    families: Annotated[str, typer.Option(help="Comma list of families.")] = "single,binding,counting,spatial,size",
    prompts: Annotated[int, typer.Option(help="Held-out prompts per family.")] = 24,
    samples: Annotated[int, typer.Option(help="Images per prompt (N of best-of-N; at least 2).")] = 8,
    split: Annotated[str, typer.Option(help="Prompt split.")] = "test",
    seed: Annotated[int, typer.Option(help="Seed of prompts and noise.")] = 0,
    pipeline: Annotated[str, typer.Option(help="Base pipeline sampled from (when no --checkpoint).")] = "base",
    checkpoint: Annotated[Optional[str], typer.Option(help="Sample from a trained checkpoint: a directory, runs:/ or models:/ URI.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (runs:/ and models:/ checkpoints, --mlflow).")] = None,
    mlflow_run: Annotated[bool, typer.Option("--mlflow", help="Also log the diagnosis as an MLflow run (experiment ralign-diagnose).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the diagnosis JSON here.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write the table as Markdown here.")] = None,
) -> None:
    """Sample N images per held-out prompt, score them with the reward and judge them with the oracle: the random,
    reward-best-of-N and oracle-best-of-N all-correct rates and the within-prompt pairwise accuracy, per family,
    with 95 % intervals."""
    from ralign.config import load_config, refuse_credentials

    if tracking_uri is not None:
        refuse_credentials(tracking_uri, "--tracking-uri")
    settings = {}
    if config is not None:
        from ralign.training.config import TrainConfig

        cfg = load_config(TrainConfig, config)
        reward = reward or cfg.reward.name
        options = options if options is not None else json.dumps(cfg.reward.options)
        settings = {k: getattr(cfg.model.policy, k) for k in ("steps", "eta", "guidance", "text_encoding", "segment_budget")}
    if reward is None:
        raise UserError("name a reward: --reward NAME, or --config with a reward section")
    try:
        opts = json.loads(options) if options else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"--options is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(opts, dict):
        raise UserError("--options must be a JSON object of the reward's options")
    if deployment and not address:
        raise UserError("--deployment needs --address (the Ray cluster the reward application runs on)")
    _setup_logging()
    from jobs.diagnose import diagnose_reward, log_to_mlflow, markdown_table

    if address:
        from jobs.submit import connect

        connect(address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}})
    result = diagnose_reward(reward_name=reward, options=opts, deployment=deployment,
                             families=[f.strip() for f in families.split(",") if f.strip()], prompts=prompts,
                             samples=samples, split=split, seed=seed, pipeline=pipeline, checkpoint=checkpoint,
                             tracking_uri=tracking_uri, policy_settings=settings)
    table = markdown_table(result)
    typer.echo(table)
    if mlflow_run:
        from ralign.ops.tracking import resolve_tracking_uri

        run_id = log_to_mlflow(result, resolve_tracking_uri(tracking_uri))
        result["mlflow_run_id"] = run_id
        typer.echo(f"MLflow run {run_id}")
    if json_out is not None:
        _emit_json(result, json_out)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table + "\n", encoding="utf-8")


@app.command("generate")
def generate_command(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A UTF-8 text file, one prompt per line.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="A training checkpoint directory, or an MLflow URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/checkpoint (default: the base model).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for models:/ and runs:/ (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
    pipeline: Annotated[str, typer.Option(help="Base pipeline when no --checkpoint is given.")] = "base",
    text_encoder_weight: Annotated[float, typer.Option(help="TextCraftor interpolation: w·tuned + (1 − w)·original text embeddings.")] = 1.0,
    mix: Annotated[Optional[list[str]], typer.Option(help="Blend in another tuned text encoder: CHECKPOINT_DIR=WEIGHT (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory (PNGs, grid.png, prompts.txt).")] = Path("outputs/generate"),
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the checkpoint's).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sampling steps (DDIM, or the flow ODE; default: the checkpoint's evaluation steps).")] = None,
    truncate: Annotated[bool, typer.Option(help="Generate from prompts longer than the text encoding reads, cutting off the rest (default: refuse them).")] = False,
) -> None:
    """Generate images with the base model or a trained checkpoint, optionally interpolating text encoders."""
    from ralign.ops.prompt_input import check_prompt, check_token_budget, describe_lines, read_prompt_file

    # Every prompt is checked before a model is loaded or a file written (ralign/ops/prompt_input.py).
    sources = [check_prompt(p, f"--prompt {i}") for i, p in enumerate(prompt or [], 1)]
    if prompts_file is not None:
        from_file, blank = read_prompt_file(prompts_file)
        sources += from_file
        if blank:
            typer.echo(f"note: {prompts_file}: skipped {len(blank)} blank line(s): {describe_lines(blank)}", err=True)
    if not sources:
        raise UserError("no prompts: give --prompt or --prompts-file")
    mixes = []
    for item in mix or []:
        path, sep, weight = item.rpartition("=")
        if not sep or not path:
            raise UserError(f"--mix {item!r}: expected CHECKPOINT_DIR=WEIGHT")
        try:
            mixes.append((path, float(weight)))
        except ValueError:
            raise UserError(f"--mix {item!r}: the weight {weight!r} is not a number") from None
    _setup_logging()
    from PIL import Image

    from ralign.models.weights import read_safetensors
    from ralign.world.evaluation import write_grid
    from ralign.diffusion.policy import build_policy, policy_from_checkpoint

    prompts = [p.text for p in sources]
    overrides = {k: v for k, v in (("guidance", guidance), ("eval_steps", steps)) if v is not None}
    if checkpoint is None:
        if text_encoder_weight != 1.0 or mix:
            raise UserError("--text-encoder-weight and --mix need a --checkpoint with a tuned text encoder")
        policy = build_policy({"pipeline": pipeline, "policy": {"unet_lora_rank": 0, **overrides}})
    else:
        from ralign.ops.model_registry import local_checkpoint

        with local_checkpoint(checkpoint, tracking_uri) as local:  # an MLflow URI is downloaded to a temporary dir
            policy = policy_from_checkpoint(local, source=checkpoint, text_encoder_weight=text_encoder_weight, **overrides)
        if text_encoder_weight != 1.0 and policy.cfg.text_encoder == "frozen":
            raise UserError(f"{checkpoint} has no tuned text encoder to interpolate (its policy has text_encoder=frozen)")
        for path, weight in mixes:
            with local_checkpoint(path, tracking_uri) as mixed:
                label = f"{path}/trainable.safetensors"
                policy.mix_text_encoder(read_safetensors(mixed / "trainable.safetensors", label), weight, source=label)
    for note in check_token_budget(sources, policy.prompt_overflow, allow_truncation=truncate):
        typer.echo(f"note: {note}; generating from what fits (--truncate)", err=True)
    images = policy.generate_images(prompts, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:04d}.png")
    write_grid(out / "grid.png", prompts, images, max_images=64, judge=False)
    # One prompt per line, in image order; the checks above guarantee no prompt holds a line break.
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    typer.echo(f"wrote {len(images)} images, grid.png and prompts.txt to {out}")


@app.command("sft")
def sft_command(
    config: Annotated[Path, typer.Option(help="SFT config YAML.")] = Path("jobs/configs/longalign_sft.yaml"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: a.b=value (repeatable).")] = None,
) -> None:
    """Supervised fine-tuning stage (LongAlign stage 1): denoising loss with the policy's text encoding; writes a
    checkpoint that a training config starts from with model.init_checkpoint."""
    _setup_logging()
    from jobs.sft import run_sft
    from ralign.training.config import SFTConfig
    from ralign.config import load_config

    result = run_sft(load_config(SFTConfig, config, set_ or []))
    typer.echo(json.dumps(result, indent=2))


@app.command("compare")
def compare_command(
    methods: Annotated[str, typer.Option(help="Comma list of rows.")] = "base,dpok,refl,draft,longalign,comat,textcraftor,textcraftor_unet,flow_base,flow_grpo",
    n: Annotated[int, typer.Option(min=1, help="Held-out test prompts per family (claims need at least 100).")] = 100,
    out: Annotated[Path, typer.Option(help="Directory for the Markdown table, grids and montages.")] = Path("outputs/compare"),
    json_out: Annotated[Path, typer.Option("--json", help="The results JSON (rows of an earlier run with the same config are reused).")] = Path("benchmarks/results/compare.json"),
    rerun: Annotated[bool, typer.Option(help="Train every method again even if the JSON holds a row with the same config and weights.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a field in every method's config: a.b=value.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: each config's).")] = None,
) -> None:
    """Train (or reuse) every seed method and baseline, and write one table of oracle metrics on held-out prompts."""
    if tracking_uri is not None:
        from ralign.config import refuse_credentials

        refuse_credentials(tracking_uri, "--tracking-uri")
    _setup_logging()
    from jobs.compare import compare, markdown_table

    results = compare([m.strip() for m in methods.split(",") if m.strip()], out, json_out, n_per_family=n, reuse=not rerun,
                      tracking_uri=tracking_uri, extra_overrides=set_ or [])
    typer.echo(markdown_table(results))
    typer.echo(f"wrote {json_out}, {out / 'compare.md'} and per-family montages in {out}")


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option(help="Training config YAML (see jobs/configs/).")] = Path("jobs/configs/quickstart.yaml"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: a.b=value (repeatable).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue this MLflow run from its last checkpoint (with its own config).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: tracking.tracking_uri).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the run summary JSON here.")] = None,
) -> None:
    """Fine-tune a diffusion model with RL on a Ray cluster (a local one by default), tracked in MLflow."""
    from ralign.config import load_config, refuse_credentials

    if tracking_uri is not None:
        refuse_credentials(tracking_uri, "--tracking-uri")  # the job logs the URI it writes to
    _setup_logging()
    from jobs.train import TrainingFailed, train
    from ralign.training.config import TrainConfig

    # A resumed run uses the config it was started with (logged in MLflow); --set still applies on top of it.
    cfg = None if resume else load_config(TrainConfig, config, set_ or [])
    try:
        summary = train(cfg, resume=resume, tracking_uri=tracking_uri, overrides=set_ or [])
    except TrainingFailed as exc:  # the traceback is in the log above; the reason, once, is the last line
        typer.echo(f"error: training failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _emit_json(summary, json_out)
    o_before, o_after = summary.get("oracle_before"), summary.get("oracle_after")
    typer.echo(f"MLflow run {summary['run_id']} at {summary['tracking_uri']} (open with: mlflow ui --backend-store-uri {summary['tracking_uri']})")
    if summary["reward_first"] is not None:
        typer.echo(f"training reward: first 10% of iterations {summary['reward_first']:.4f} -> last 10% {summary['reward_last']:.4f}")
    change = summary.get("oracle_change")
    if change:
        typer.echo(describe_change(change))
        if summary["reward_hacking"]:
            typer.echo(f"WARNING reward hacking: the training reward rose while held-out all-correct fell on "
                       f"{', '.join(summary['reward_hacking'])}")
    elif o_before and o_after:
        typer.echo(f"oracle all-correct on held-out prompts: {o_before['overall']['all_correct']:.3f} -> {o_after['overall']['all_correct']:.3f}")
    if summary.get("oracle_change_vs_pretrained"):
        typer.echo("against the pretrained model (the run started from an earlier stage; same prompts and noise):")
        typer.echo(describe_change(summary["oracle_change_vs_pretrained"]))
        if summary["reward_hacking_vs_pretrained"]:
            typer.echo(f"WARNING reward hacking against the pretrained model: the training reward rose while held-out "
                       f"all-correct fell on {', '.join(summary['reward_hacking_vs_pretrained'])}")
    typer.echo(f"checkpoint: {summary['checkpoint']}")


def describe_change(change: dict) -> str:
    """The paired before -> after table of a run (or of a comparison against the base), intervals included."""
    def line(name: str, c: dict) -> str:
        lo, hi = c["ci"]
        return f"  {name:<8} {c['before']:.3f} -> {c['after']:.3f}  {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]  n={c['n']}"

    o = change["overall"]
    head = (f"oracle all-correct on held-out prompts: {o['before']:.3f} -> {o['after']:.3f} ({o['diff']:+.3f}, paired 95% "
            f"interval [{o['ci'][0]:+.3f}, {o['ci'][1]:+.3f}], same prompts and noise before and after)")
    rows = [line(fam, c) for fam, c in change["families"].items()] + [line("overall", o)]
    return "\n".join([head, "  family   before -> after  change [95% interval]", *rows])


@app.command("export")
def export_command(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint directory, runs:/RUN_ID/checkpoint, models:/NAME@ALIAS or models:/NAME/VERSION.")],
    out: Annotated[Path, typer.Option(help="The export directory (must not exist, or be empty).")],
    format_: Annotated[str, typer.Option("--format", help="lora: diffusers' pytorch_lora_weights.safetensors; pipeline: a whole StableDiffusionPipeline directory (needed when the text encoder was tuned).")] = "lora",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for runs:/ and models:/ (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
) -> None:
    """Write a trained checkpoint in the layouts diffusers and peft read, with a model card."""
    if tracking_uri is not None:
        from ralign.config import refuse_credentials

        refuse_credentials(tracking_uri, "--tracking-uri")
    _setup_logging()
    from ralign.ops.export import export_checkpoint

    result = export_checkpoint(checkpoint, out, format_, tracking_uri)
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {result['format']} export to {result['out']}: {', '.join(result['files'][:6])}"
               + (" ..." if len(result["files"]) > 6 else ""))


@app.command("soup")
def soup_command(
    checkpoints: Annotated[list[str], typer.Argument(help="Two or more checkpoints of one base model and policy: directories, runs:/RUN_ID/checkpoint, models:/NAME@ALIAS or models:/NAME/VERSION.")],
    out: Annotated[Path, typer.Option(help="The soup's checkpoint directory (must not exist, or be empty).")],
    weights: Annotated[Optional[str], typer.Option(help="Comma list of one weight per checkpoint, normalised to sum 1 (default: equal).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for runs:/ and models:/, and where the runs' reward-hacking verdicts are looked up (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
    allow_flagged: Annotated[bool, typer.Option(help="Soup runs that `ralign train` flagged for reward hacking too (refused by default).")] = False,
) -> None:
    """Average several runs' weight changes into one checkpoint (a model soup: e.g. seeds of one recipe), exactly:
    the LoRA adapters are concatenated, not their factors averaged. `ralign eval --checkpoint OUT` measures it.
    Runs flagged for reward hacking are refused unless --allow-flagged."""
    if tracking_uri is not None:
        from ralign.config import refuse_credentials

        refuse_credentials(tracking_uri, "--tracking-uri")
    parsed = None
    if weights is not None:
        try:
            parsed = [float(x) for x in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights!r}: expected a comma list of numbers") from None
    from ralign.ops.soup import soup_checkpoints

    result = soup_checkpoints(checkpoints, out, parsed, tracking_uri, allow_flagged)
    for ref, families in result["flagged"].items():
        typer.echo(f"warning: {ref} was flagged for reward hacking on {', '.join(families)} (souped: --allow-flagged)", err=True)
    if result["unchecked"]:
        typer.echo(f"note: no reward-hacking verdict found for {', '.join(result['unchecked'])} (not in the "
                   "tracking store, or not finished); check their runs' summaries before trusting the soup", err=True)
    ranks = ", ".join(f"{k} {v}" for k, v in result["policy"].items() if v is not None)
    typer.echo(f"wrote the soup of {len(checkpoints)} checkpoints (weights {', '.join(f'{w:.3f}' for w in result['weights'])}) "
               f"to {result['out']}: {result['tensors']} tensors; {ranks}")


@app.command("promote")
def promote_command(
    run: Annotated[str, typer.Option(help="The finished `ralign train` MLflow run to register.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    metric: Annotated[Optional[str], typer.Option(help="Oracle metric in oracle_after.json, e.g. overall.all_correct, binding.count_acc, fidelity.kid (default: the model's ralign.metric tag, else overall.all_correct).")] = None,
    margin: Annotated[float, typer.Option(min=0.0, help="The candidate must beat the champion by more than this.")] = 0.01,
    direction: Annotated[str, typer.Option(help="auto, higher or lower is better (auto: lower for artifact_rate, kid, off_palette_fraction).")] = "auto",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result JSON here.")] = None,
) -> None:
    """Register a run's checkpoint in the MLflow model registry; move the `champion` alias to it if it beats the
    current champion by the margin on the same eval set, else set `challenger` and say why."""
    from ralign.ops.model_registry import promote

    result = promote(run, name, metric=metric, margin=margin, direction=direction, tracking_uri=tracking_uri)
    if json_out is not None:
        _emit_json(result.to_dict(), json_out)
    typer.echo(result.message())


@k8s_app.command("render")
def k8s_render(
    out: Annotated[Path, typer.Option(help="Directory for base/ and overlays/ (the committed tree is k8s/).")] = Path("k8s"),
    config: Annotated[Path, typer.Option(help="Training config of the base (inside the repo: the image carries it).")] = Path("jobs/configs/quickstart.yaml"),
    serve_config: Annotated[Path, typer.Option(help="Reward servers' config: the RayService's serveConfigV2.")] = Path("jobs/configs/serve_rewards.yaml"),
    overlay: Annotated[Optional[list[str]], typer.Option(help="NAME=CONFIG: an overlay patching the base into CONFIG's manifests (repeatable; default toy=jobs/configs/quickstart.yaml, sd15=jobs/configs/sd15.yaml and sd35=jobs/configs/sd35.yaml).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a field of every training config: a.b=value (repeatable; also passed to the job).")] = None,
    image: Annotated[str, typer.Option(help="Image NAME:TAG (GPU configs' overlays use TAG-gpu).")] = "ghcr.io/ralign/ralign:0.1.0",
) -> None:
    """Render the KubeRay manifests (kustomize base + overlays) from the training and Serve configs."""
    from ralign.ops.k8s import DEFAULT_OVERLAYS, render_tree, write_tree

    overlays = dict(DEFAULT_OVERLAYS)
    if overlay:
        overlays = {}
        for item in overlay:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--overlay {item!r}: expected NAME=CONFIG")
            overlays[name] = path
    written = write_tree(render_tree(config, serve_config, overlays, set_ or [], image), out)
    typer.echo(f"wrote {len(written)} files to {out} (base/ and overlays/{','.join(overlays)}/)")


@k8s_app.command("validate")
def k8s_validate(
    root: Annotated[Path, typer.Option("--dir", help="A rendered tree (base/, overlays/).")] = Path("k8s"),
    crds: Annotated[Optional[Path], typer.Option(help="KubeRay v1.7.0 CRD directory (default: $RALIGN_KUBERAY_CRDS or ../shared/kuberay-crds).")] = None,
) -> None:
    """Check every manifest and every overlay's build: KubeRay CRD schemas, Kubernetes schemas, the project's rules."""
    from ralign.ops.k8s import validate_tree

    checked = validate_tree(root, crds)
    typer.echo("\n".join(checked + [f"{len(checked)} objects valid"]))


bench_app = typer.Typer(help="Benchmarks: pipeline stages, direct-backprop memory, scaling (JSON results).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("memory")
def bench_memory(
    config: Annotated[Path, typer.Option(help="Training config (its model, reward and micro-batch).")] = Path("jobs/configs/draft.yaml"),
    k: Annotated[str, typer.Option(help="Comma-separated gradient-step counts K.")] = "1,2,5,10,25",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads in the measuring process.")] = 2,
    json_out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("benchmarks/results/bench_memory.json"),
) -> None:
    """Peak memory and step time of one DRaFT-K update versus K, with and without gradient checkpointing."""
    _setup_logging()
    from jobs.bench.memory import run

    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--k {k!r}: expected comma-separated integers, e.g. 1,2,5") from None
    result = run(config, ks, set_ or [], threads)
    _emit_json(result, json_out)
    for row in result["rows"]:
        typer.echo(f"K={row['k']:>3} checkpointing={str(row['checkpointing']):5} " +
                   (row.get("error") or f"step {row['step_s']:.2f}s  memory +{row['peak_growth_mb']:.0f} MB"))
    typer.echo(f"growth exponent (memory ~ K^e): {result['growth_exponent']}")


@bench_app.command("pipeline")
def bench_pipeline(
    config: Annotated[Path, typer.Option(help="A training config whose algorithm learns from scored rollouts (DPOK, GRPO, RSFT).")] = Path("jobs/configs/quickstart.yaml"),
    iterations: Annotated[int, typer.Option(min=1, help="Measured iterations per mode (after the warm-up ones).")] = 6,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up iterations left out of every mode's rates.")] = 2,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("benchmarks/results/bench_pipeline.json"),
) -> None:
    """Samples/s of each stage alone, of a sequential loop, and of the Ray pipeline; waits, Ray overhead, peak RSS."""
    _setup_logging()
    from jobs.bench.pipeline import run

    result = run(config, iterations, set_ or [], warmup)
    _emit_json(result, json_out)
    rates = result["samples_per_s"]
    typer.echo("samples/s: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    typer.echo(f"pipeline / sequential {result['ratio_pipeline_vs_sequential']:.2f}x; iteration / slowest stage "
               f"({result['slowest_stage']}) {result['ratio_iteration_vs_slowest_stage']:.2f}x; Ray overhead "
               f"{100 * result['ray_overhead_fraction']:.1f}% of an iteration")


@bench_app.command("scale")
def bench_scale(
    config: Annotated[Path, typer.Option(help="Training config (its policy and request batch).")] = Path("jobs/configs/quickstart.yaml"),
    samplers: Annotated[str, typer.Option(help="Comma-separated sampler-actor counts, one simulated node each.")] = "1,2,4",
    requests: Annotated[int, typer.Option(min=1, help="Requests per sampler in the measured burst.")] = 4,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Results JSON.")] = Path("benchmarks/results/bench_scale.json"),
) -> None:
    """Sampler throughput and weight-broadcast cost on a simulated multi-node Ray cluster (ray.cluster_utils)."""
    _setup_logging()
    from jobs.bench.scale import run

    try:
        counts = [int(x) for x in samplers.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--samplers {samplers!r}: expected comma-separated integers, e.g. 1,2,4") from None
    result = run(config, counts, requests, set_ or [])
    _emit_json(result, json_out)
    for row in result["rows"]:
        typer.echo(f"{row['samplers']} sampler(s): {row['samples_per_s']:.2f} samples/s (x{row['speedup']:.2f}), "
                   f"weight broadcast {1000 * row['weight_broadcast_s']:.1f} ms")


@app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Option(help="Reward-server config.")] = Path("jobs/configs/serve_rewards.yaml"),
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to deploy on (default: start a local one).")] = None,
    only: Annotated[Optional[list[str]], typer.Option(help="Deploy only these applications (repeatable).")] = None,
    detach: Annotated[bool, typer.Option(help="Return once deployed (with --address); otherwise serve until Ctrl-C.")] = False,
) -> None:
    """Start the reward servers of a Serve config on Ray Serve (autoscaling, batched, HTTP ingress on its host:port)."""
    _setup_logging()
    import time

    import ray

    from ralign.config import load_config
    from ralign.ops.serve_config import ServeConfig

    cfg = load_config(ServeConfig, config)
    cfg.validate_with_ray()
    unknown = set(only or []) - {d.name for d in cfg.deployments}
    if unknown:
        raise UserError(f"--only {sorted(unknown)}: not in {config} (it serves {[d.name for d in cfg.deployments]})")
    if detach and not address:
        raise UserError("--detach needs --address: a local Ray instance ends with this command")
    if address:
        from jobs.submit import connect

        connect(address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}})
    else:
        ray.init()
    from actors.serve import deploy, replica_counts

    routes = deploy(cfg, only)
    for name, url in routes.items():
        typer.echo(f"{name}: POST {url}  (handle: serve.get_app_handle({name!r}))")
    if detach:
        return
    try:
        while True:
            typer.echo("replicas: " + ", ".join(f"{k}={v}" for k, v in sorted(replica_counts().items())))
            time.sleep(30)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


@app.command("submit")
def submit_cmd(
    address: Annotated[str, typer.Option(help="Ray job server, e.g. http://127.0.0.1:8265.")],
    config: Annotated[Path, typer.Option(help="Training config (inside the project: it ships with the job).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI as the cluster sees it.")] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends; exit 1 if it fails.")] = True,
    job_id: Annotated[Optional[str], typer.Option(help="Submission id (default: generated).")] = None,
    forward_env: Annotated[Optional[list[str]], typer.Option("--forward-env", help="Give the job this variable of your environment, e.g. MLFLOW_TRACKING_TOKEN (repeatable). Ray shows a job's environment in its job info.")] = None,
) -> None:
    """Submit a training run as a Ray job (the project ships as its working_dir); prints the job id."""
    from jobs.submit import follow as follow_logs
    from jobs.submit import submit

    if forward_env:
        typer.echo(f"note: forwarding {', '.join(forward_env)}: Ray keeps a job's environment in its job info, readable "
                   "from the dashboard and job API; on a shared cluster give credentials to the cluster instead "
                   "(a Kubernetes Secret, see k8s/)", err=True)
    jid = submit(address, config, set_ or [], tracking_uri, job_id, forward_env=forward_env or [])
    typer.echo(f"job id: {jid}", err=True)
    if follow:
        state = follow_logs(address, jid)
        typer.echo(f"job {jid}: {state}", err=True)
        if state != "SUCCEEDED":
            raise typer.Exit(1)
    typer.echo(jid)


@app.command("status")
def status_cmd(job_id: str, address: Annotated[str, typer.Option(help="Ray job server.")] = "http://127.0.0.1:8265") -> None:
    """A Ray job's status (JSON)."""
    from jobs.submit import status

    typer.echo(json.dumps(status(address, job_id), indent=2))


@app.command("stop")
def stop_cmd(job_id: str, address: Annotated[str, typer.Option(help="Ray job server.")] = "http://127.0.0.1:8265") -> None:
    """Stop a running Ray job."""
    from jobs.submit import stop

    typer.echo(f"job {job_id}: {'stop requested' if stop(address, job_id) else 'already finished'}")


@app.command("logs")
def logs_cmd(
    job_id: str,
    address: Annotated[str, typer.Option(help="Ray job server.")] = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option(help="Keep streaming until the job ends.")] = False,
) -> None:
    """A Ray job's logs."""
    from jobs.submit import follow as follow_logs
    from jobs.submit import logs

    if follow:
        follow_logs(address, job_id)
    else:
        typer.echo(logs(address, job_id), nl=False)


@app.command("report")
def report_cmd(
    run_id: Annotated[str, typer.Argument(help="The `ralign train` MLflow run.")],
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report directory (default: outputs/report/RUN_ID).")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log the report to the run as the report/ artefact.")] = False,
) -> None:
    """An HTML page (and PNGs) of a run: reward, KL, oracle metrics, timings, image grids start -> end."""
    _setup_logging()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # report.py logs one line per download
    from ralign.ops.report import build_report

    index = build_report(run_id, tracking_uri=tracking_uri, out_dir=out, log_to_run=not no_log)
    typer.echo(f"wrote {index}" + ("" if no_log else f" (also logged to run {run_id} as report/)"))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the toy world never needs the network; real runs may unset it
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A progress bar per downloaded checkpoint file would bury a command's one-line answer.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
