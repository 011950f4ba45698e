"""`ralign compare`: train (or reuse) every method for its default budget on the toy world and tabulate what each did
to prompt alignment, measured by the oracle on held-out `test` prompts (including colour-shape combinations never
seen in training), with fidelity, training reward and wall time.

Rows: `base` (no training) and one per method config; every trained row is one `ralign train` run (same engine,
same MLflow tracking) with the evaluation settings overridden to be identical across rows: split `test`, all six
families, `n_per_family` prompts, seed 0, each model at its own sampling settings. Results are written after every
method (a crash loses nothing already measured), as JSON (`benchmarks/results/compare.json` shape) and Markdown, plus
per-method, per-family image grids and one montage per family (a row of images per method).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import time
from pathlib import Path

from ralign.config import ConfigError, UserError, load_config
from ralign.training.config import SFTConfig, TrainConfig
from ralign.world.prompts import FAMILIES

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS: dict[str, str | None] = {
    "base": None,
    "grpo": "quickstart.yaml",  # GRPO + CLIP score: the README's main job
    "dpok": "dpok.yaml",  # DPOK + CLIP score
    "refl": "refl.yaml",  # ReFL + preference
    "draft": "draft.yaml",  # direct backprop (DRaFT-K) + preference
    "draft_detector": "draft_detector.yaml",  # DRaFT over the whole chain + the differentiable detector reward
    "longalign": "longalign.yaml",
    "comat": "comat.yaml",
    "textcraftor": "textcraftor.yaml",
    "textcraftor_unet": "textcraftor_unet.yaml",
    "flow_base": None,
    "flow_grpo": "flow_grpo.yaml",  # Flow-GRPO + detector reward on the toy flow-matching model
}
# The untrained rows: each evaluates a base model at the sampling settings of the config named here (its trained rows
# start from that model with those settings).
BASE_SETTINGS: dict[str, str] = {"base": "draft.yaml", "flow_base": "flow_grpo.yaml"}
# Stages a method's config needs first (its model.init_checkpoint): method -> SFT config. Run whenever the method is
# (re)trained; the stage's wall time counts towards the method's.
PRE_STAGES: dict[str, str] = {"longalign": "longalign_sft.yaml"}
LABELS = {
    "base": "base (no training)", "grpo": "GRPO + CLIP score (quickstart)", "dpok": "DPOK + CLIP score", "refl": "ReFL + preference",
    "draft": "DRaFT-2 + preference", "draft_detector": "DRaFT (whole chain) + soft detector", "longalign": "LongAlign", "comat": "CoMat", "textcraftor": "TextCraftor",
    "textcraftor_unet": "TextCraftor + UNet", "flow_base": "flow base (no training)", "flow_grpo": "Flow-GRPO + detector (flow model)",
}
FAMILY_METRICS = ("all_correct", "object_recall", "binding_acc", "count_acc", "spatial_acc", "artifact_rate")


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()}


CURVE_POINTS = 4  # evaluations during training (for samples-to-target), on CURVE_N prompts per family
CURVE_N = 32
TARGETS = (0.05, 0.10)  # samples-to-target: held-out overall all-correct above the model before training by these


def method_config(method: str, n_per_family: int, tracking_uri: str | None, extra: list[str]) -> TrainConfig:
    iterations = load_config(TrainConfig, CONFIG_DIR / METHODS[method], extra).train.iterations
    overrides = [
        "train.eval.split=test", f"train.eval.n_per_family={n_per_family}", f"train.eval.families={json.dumps(list(FAMILIES))}",
        "train.eval.before_after=true", f"train.eval.every={max(1, iterations // CURVE_POINTS)}",
        f"train.eval.curve_n_per_family={min(CURVE_N, n_per_family)}", "train.seed=0", "tracking.experiment=ralign-compare",
        f"tracking.run_name=compare-{method}", *extra,
    ]
    if tracking_uri:
        overrides.append(f"tracking.tracking_uri={tracking_uri}")
    return load_config(TrainConfig, CONFIG_DIR / METHODS[method], overrides)


def samples_to_target(summary: dict, cfg: TrainConfig) -> dict:
    """For each target, the training samples (and wall seconds since the run started) at which held-out overall
    all-correct first exceeded the model before training by it; None where it never did. Each curve point is
    compared with the same prompts before training (the curve uses the first prompts of the before set)."""
    from mlflow.tracking import MlflowClient

    before, after = summary["oracle_before"], summary["oracle_after"]
    curve_n = cfg.train.eval.curve_n_per_family or cfg.train.eval.n_per_family

    def base_rate(n: int) -> float:
        values = [v for f in before["per_prompt"].values() for v in f["all_correct"][:n]]
        return sum(values) / len(values)

    client = MlflowClient(summary["tracking_uri"])
    start = client.get_run(summary["run_id"]).info.start_time
    history = sorted(client.get_metric_history(summary["run_id"], "oracle/overall/all_correct"), key=lambda m: m.step)
    per_sample = cfg.train.batch_size * cfg.ray.learners
    points = [(m.step, m.value, (m.timestamp - start) / 1000, base_rate(curve_n)) for m in history
              if 0 < m.step < cfg.train.iterations]
    points.append((cfg.train.iterations, after["overall"]["all_correct"], None, base_rate(cfg.train.eval.n_per_family)))
    out = {}
    for target in TARGETS:
        hit = next((p for p in points if p[1] > p[3] + target), None)
        out[f"+{target:.2f}"] = None if hit is None else {"iteration": hit[0], "samples": hit[0] * per_sample,
                                                          "wall_s": None if hit[2] is None else round(hit[2], 1)}
    return out


# Settings added after rows were stored, by config section, with the default that reproduces the older behaviour. At
# that default a setting cannot change a row's numbers, so it stays out of the digest and the stored rows stay valid.
_SETTINGS_ADDED = {
    ("model", "policy"): {"segment_keep_eos": False, "segment_plain_short": False},
    ("algorithm", "grpo"): {"shared_initial_noise": False},
}


def _added_at_default(cfg) -> dict:
    """A pydantic `exclude` for the settings of _SETTINGS_ADDED that `cfg` leaves at their old behaviour."""
    exclude: dict = {}
    for (outer, inner), added in _SETTINGS_ADDED.items():
        section = getattr(getattr(cfg, outer, None), inner, None)
        at_default = {k for k, default in added.items() if section is not None and getattr(section, k, None) == default}
        if at_default:
            exclude.setdefault(outer, {})[inner] = at_default
    return exclude


def _digest(cfg: TrainConfig | None, n_per_family: int, pre_stage: SFTConfig | None = None) -> str:
    """What a stored row was made from: the method's training config and, for a method with a pre-stage (LongAlign's
    stage 1), that stage's config too, so that changing either one makes the row stale."""
    if cfg is None:
        return hashlib.sha256(f"base-{n_per_family}".encode()).hexdigest()[:12]
    init, checkout = cfg.model.init_checkpoint, Path.cwd().resolve()
    if init and Path(init).is_relative_to(checkout):
        # The config resolves the path to an absolute one (for Ray workers); the row is the same in any checkout.
        relative = Path(init).relative_to(checkout).as_posix()
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_checkpoint": relative})})
    # Settings that cannot change a row's numbers stay out, so adding one does not invalidate every stored row.
    added = _added_at_default(cfg)
    text = cfg.model_dump_json(exclude={"tracking": True, "reward": {"deployment"}, **added,
                                        "ray": {"metric_wait_s", "reward_timeout_s", "max_score_attempts", "max_reward_errors"},
                                        "train": {"eval": {"against_pretrained"}}})  # an extra evaluation, not a change
    if pre_stage is not None:
        text += pre_stage.model_dump_json(exclude={"tracking": True, "log_every": True, **_added_at_default(pre_stage)})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pre_stage_config(method: str, cfg: TrainConfig, tracking_uri: str | None) -> SFTConfig | None:
    """The config of the stage `method` starts from (PRE_STAGES), checked to write what the method reads; None if it
    has none."""
    if method not in PRE_STAGES:
        return None
    sft_cfg = load_config(SFTConfig, CONFIG_DIR / PRE_STAGES[method], [f"tracking.run_name=compare-{method}-sft"] +
                          ([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else []))
    if Path(sft_cfg.out).resolve() != Path(cfg.model.init_checkpoint):
        raise ConfigError(f"{PRE_STAGES[method]} writes {sft_cfg.out} but {METHODS[method]} starts from {cfg.model.init_checkpoint}")
    return sft_cfg


def _base_digest(method: str, n_per_family: int) -> str:
    # "base-N" for the UNet base keeps the stored row valid; other bases add their name.
    name = f"base-{n_per_family}" if method == "base" else f"{method}-{n_per_family}"
    return hashlib.sha256(name.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _fingerprint(directory: Path) -> str:
    # One hash per model directory and process: every save of the table checks every row, and most rows share the
    # base pipeline (28 MB); a compare run does not change the committed weights it reads.
    from ralign.models.weights import weights_fingerprint

    return weights_fingerprint(directory)


def weights_read(method: str, cfg: TrainConfig | None) -> dict[str, str]:
    """{model directory: fingerprint} of the weights a row is made from: the policy's pipeline and every model its
    reward reads (the reward says which). A config digest cannot see retrained weights behind the same path."""
    from ralign.models import TINY_RANDOM, TOY_MODELS_DIR, resolve_model_path
    from ralign.rewards.registry import model_dirs

    model = cfg.model if cfg is not None else load_config(TrainConfig, CONFIG_DIR / BASE_SETTINGS[method]).model
    # A hub id (or a pipeline built in memory for tests) is named by the config digest already.
    where = None if model.pipeline in TINY_RANDOM else Path(resolve_model_path(model.pipeline))
    dirs = [where.resolve()] if where is not None and where.is_dir() else []
    if cfg is not None:
        spec = cfg.reward.spec()
        dirs += model_dirs(spec.pop("name"), spec)

    def label(d: Path) -> str:
        return d.relative_to(TOY_MODELS_DIR).as_posix() if d.is_relative_to(TOY_MODELS_DIR) else str(d)

    return {label(d): _fingerprint(d) for d in dict.fromkeys(dirs)}


def changed_weights(stored_row: dict, weights: dict[str, str]) -> list[str]:
    """The model directories whose weights differ from those a stored row was measured with (none known: [])."""
    recorded = stored_row.get("weights") or {}
    return sorted(d for d in set(recorded) | set(weights) if recorded and recorded.get(d) != weights.get(d))


def _row(report: dict, summary: dict | None, wall_s: float, digest: str, to_target: dict | None = None,
         weights: dict[str, str] | None = None) -> dict:
    s = summary or {}  # the base row has no training run
    return {
        "change": s.get("oracle_change"),  # paired: the same prompts and noise before and after training
        "reward_hacking": s.get("reward_hacking", []),
        # A method with an earlier stage (LongAlign): the change from the pretrained model, the one its claim is about.
        "change_vs_pretrained": s.get("oracle_change_vs_pretrained"),
        "reward_hacking_vs_pretrained": s.get("reward_hacking_vs_pretrained", []),
        "samples_to_target": to_target,
        "families": {f: {k: m.get(k) for k in (*FAMILY_METRICS, "all_correct_ci", "n")} for f, m in report["families"].items()},
        "overall": report["overall"],
        "unseen_combos": report.get("unseen_combos"),
        "fidelity": report["fidelity"],
        "train_reward": s.get("reward_last"),
        "train_reward_first": s.get("reward_first"),
        "reward": s.get("reward"),
        "algorithm": s.get("algorithm"),
        "iterations": s.get("iterations", 0),
        "run_id": s.get("run_id"),
        "oracle_before_overall": (s.get("oracle_before") or {}).get("overall"),
        "wall_s": round(wall_s, 1),
        "config_digest": digest,
        "weights": weights,
    }


def _in_method_order(rows: dict) -> dict:
    return {m: rows[m] for m in METHODS if m in rows}


def _save(results: dict, json_out: Path, out_dir: Path) -> None:
    """The rows in METHODS order, as JSON and Markdown."""
    results["rows"] = _in_method_order(results["rows"])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(results, json_out, out_dir)


def stale_rows(results: dict) -> dict[str, list[str]]:
    """{method: what its row was measured with that this checkout no longer has}: "an earlier config" and/or
    "earlier weights of <model directories>". `ralign compare` runs such rows again; until then the table says so."""
    stale = {}
    for method, row in results["rows"].items():
        if method not in METHODS:
            continue
        cfg = None if METHODS[method] is None else method_config(method, results["n_per_family"], None, [])
        digest = (_base_digest(method, results["n_per_family"]) if cfg is None
                  else _digest(cfg, results["n_per_family"], pre_stage_config(method, cfg, None)))
        reasons = ["an earlier config"] if row.get("config_digest") != digest else []
        changed = changed_weights(row, weights_read(method, cfg))
        reasons += [f"earlier weights of {', '.join(changed)}"] if changed else []
        if reasons:
            stale[method] = reasons
    return stale


def _write_markdown(results: dict, json_out: Path, out_dir: Path) -> None:
    md = markdown_table(results, stale_rows(results))
    (out_dir / "compare.md").write_text(md)
    json_out.with_suffix(".md").write_text(md)


def evaluate_base(method: str, n_per_family: int, out_dir: Path) -> dict:
    """An untrained base model (`BASE_SETTINGS`: the UNet base at 10 DDIM steps, guidance 3, plain encoding; the flow
    model at its 40-step ODE), on the same prompts and noise as every trained row's evaluation."""
    from ralign.diffusion.policy import build_policy
    from ralign.world.evaluation import evaluate_generator

    model = load_config(TrainConfig, CONFIG_DIR / BASE_SETTINGS[method]).model
    policy = build_policy({"pipeline": model.pipeline, "policy": {**model.policy.model_dump(), "unet_lora_rank": 0,
                                                                  "text_encoder": "frozen"}})
    return evaluate_generator(lambda prompts: policy.generate_images(prompts, seed=0), split="test", n=n_per_family, seed=0,
                              families=FAMILIES, grid_dir=out_dir / "grids" / method)


def _fetch_grids(summary: dict, dest: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    path = f"eval/iteration_{summary['iterations']:04d}"
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(summary["run_id"], path, str(dest.parent / f".{dest.name}_download")))
    for png in local.glob("grid_*.png"):
        png.replace(dest / png.name)


def write_montages(out_dir: Path, methods: list[str], earlier: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """One PNG per family: the first row of each method's grid (the same prompts and noise), labelled. A method with
    no grid in `out_dir/grids` (a row reused from an earlier table) keeps its row of the montage already in `out_dir`,
    whose rows were `earlier[family]`. Returns {family: the methods its montage shows, in order}."""
    from PIL import Image, ImageDraw

    from ralign.world.scene import IMAGE_SIZE

    row_height = IMAGE_SIZE * 2 + 6  # ralign.world.evaluation.write_grid: scale 2, 3-pixel frame
    label_w = 150
    shown = {}
    for fam in FAMILIES:
        target = out_dir / f"montage_{fam}.png"
        kept, earlier_rows = {}, (earlier or {}).get(fam) or []
        if earlier_rows and target.is_file():
            old = Image.open(target).convert("RGB")
            if old.height == row_height * len(earlier_rows):  # otherwise not the montage of those rows
                kept = {m: old.crop((0, i * row_height, old.width, (i + 1) * row_height)) for i, m in enumerate(earlier_rows)}
        rows = []
        for m in methods:
            path = out_dir / "grids" / m / f"grid_{fam}.png"
            if path.is_file():
                grid = Image.open(path).convert("RGB")
                grid = grid.crop((0, 0, grid.width, min(grid.height, row_height)))
                row = Image.new("RGB", (label_w + grid.width, grid.height), (255, 255, 255))
                row.paste(grid, (label_w, 0))
                ImageDraw.Draw(row).text((6, grid.height // 2 - 6), LABELS.get(m, m), fill=(0, 0, 0))
                rows.append((m, row))
            elif m in kept:
                rows.append((m, kept[m]))
        if not rows:
            continue
        canvas = Image.new("RGB", (max(r.width for _, r in rows), sum(r.height for _, r in rows)), (255, 255, 255))
        y = 0
        for _, r in rows:
            canvas.paste(r, (0, y))
            y += r.height
        canvas.save(target)
        shown[fam] = [m for m, _ in rows]
    return shown


def _rate(m: dict) -> str:
    ci = m.get("all_correct_ci")
    return f"{m['all_correct']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _change(c: dict | None) -> str:
    return "–" if not c else f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"


def _target(t: dict | None) -> str:
    if t is None:
        return "–"
    return f"{t['samples']}" + (f" ({t['wall_s']:.0f} s)" if t.get("wall_s") is not None else " (end)")


def markdown_table(results: dict, stale: dict[str, list[str]] | None = None) -> str:
    """The table; a row in `stale` (`stale_rows`) is marked with what it was measured with."""
    rows, stale = results["rows"], stale or {}
    fams = list(FAMILIES)
    head = ["method", *fams, "overall", "change vs before training [95%]", "samples to +0.05", "samples to +0.10",
            "KID", "artefacts", "train reward (first→last)", "reward hacking", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in rows.items():
        fam_cells = [_rate(r["families"][f]) if f in r["families"] else "" for f in fams]
        reward = (f"{r['train_reward_first']:.3f}→{r['train_reward']:.3f}" if r.get("train_reward") is not None else "–")
        targets = r.get("samples_to_target") or {}
        pretrained = r.get("change_vs_pretrained")
        change = _change(r.get("change") and r["change"]["overall"]) + (f"; vs pretrained {_change(pretrained['overall'])}" if pretrained else "")
        hacked = [*(r.get("reward_hacking") or []), *(f"{f} (vs pretrained)" for f in r.get("reward_hacking_vs_pretrained") or [])]
        hacked = ", ".join(hacked) or ("no" if r.get("change") else "–")
        label = LABELS.get(m, m) + (f" (measured with {' and '.join(stale[m])})" if m in stale else "")
        lines.append("| " + " | ".join([label, *fam_cells, _rate(r["overall"]), change,
                                         _target(targets.get("+0.05")), _target(targets.get("+0.10")),
                                         f"{r['fidelity']['kid']:.2f}", f"{r['fidelity']['artifact_rate']:.3f}", reward, hacked,
                                         f"{r['wall_s']:.0f}"]) + " |")
    lines.append("")
    lines.append(f"All-correct rate per family on {results['n_per_family']} held-out `test` prompts per family (oracle), with "
                 "its 95% interval (bootstrap over prompts); the change is paired: the run's model before and after "
                 "training on the same prompts with the same noise. Samples to +0.05 / +0.10: training samples (and wall "
                 f"seconds) at the first of {CURVE_POINTS} in-training evaluations ({CURVE_N} prompts per family, paired with "
                 "the same prompts before training) where overall all-correct exceeded the model before training by that "
                 "much; (end) when first at the final evaluation. KID x 1e3 on image statistics against clean renders of "
                 "the same prompts (lower is closer); artefacts = oracle artefact rate. Reward hacking: families whose "
                 "all-correct fell (interval below 0) while the training reward rose. A method that trains from an earlier "
                 "stage (LongAlign) is also compared with the pretrained model on the same prompts and noise (\"vs "
                 "pretrained\"). Wall time includes start-up, every "
                 "evaluation and any other load on the machine.")
    details = ["", "| method | family | change vs before [95%] | object recall | binding | count | spatial |",
               "|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        for f, v in r["families"].items():
            cells = [f"{v[k]:.2f}" if v.get(k) is not None else "–" for k in ("object_recall", "binding_acc", "count_acc", "spatial_acc")]
            change = _change((r.get("change") or {}).get("families", {}).get(f))
            details.append(f"| {LABELS.get(m, m)} | {f} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines + details) + "\n"


def compare(methods: list[str], out_dir: Path, json_out: Path, n_per_family: int = 100, reuse: bool = True,
            tracking_uri: str | None = None, extra_overrides: list[str] | None = None) -> dict:
    from jobs.train import train

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "n_per_family": n_per_family, "split": "test", "rows": {}}
    earlier_montages = {}
    if json_out.is_file():
        previous = json.loads(json_out.read_text())
        if previous.get("n_per_family") == n_per_family:
            results["rows"] = previous.get("rows", {})
            # tables written before montages were recorded: their montages show every row, in the table's order
            earlier_montages = previous.get("montages") or {f: list(results["rows"]) for f in FAMILIES}
    for method in methods:
        cfg = None if METHODS[method] is None else method_config(method, n_per_family, tracking_uri, extra_overrides or [])
        pre_stage = None if cfg is None else pre_stage_config(method, cfg, tracking_uri)
        digest = _digest(cfg, n_per_family, pre_stage) if cfg is not None else _base_digest(method, n_per_family)
        weights = weights_read(method, cfg)
        stored = results["rows"].get(method, {})
        if reuse and stored.get("config_digest") == digest:
            changed = changed_weights(stored, weights)
            if not changed:
                log.info("compare: reusing %s (same config, digest %s; same weights)", method, digest)
                continue
            log.info("compare: %s was measured with other weights of %s; running it again", method, ", ".join(changed))
        log.info("compare: %s ...", method)
        start = time.time()
        if pre_stage is not None:
            from jobs.sft import run_sft

            run_sft(pre_stage)
        if cfg is None:
            report, summary = evaluate_base(method, n_per_family, out_dir), None
        else:
            summary = train(cfg)
            report = summary["oracle_after"]
            _fetch_grids(summary, out_dir / "grids" / method)
        to_target = samples_to_target(summary, cfg) if summary else None
        results["rows"][method] = _row(report, summary, time.time() - start, digest, to_target, weights)
        _save(results, json_out, out_dir)
        log.info("compare: %s done in %.0fs: overall all-correct %.3f", method, time.time() - start, report["overall"]["all_correct"])
    results["montages"] = write_montages(out_dir, list(_in_method_order(results["rows"])), earlier_montages)
    _save(results, json_out, out_dir)  # also when every row was reused: rows merged from parallel runs get ordered
    return results
