"""`ralign report RUN_ID`: one HTML page (plus PNGs next to it) summarising a `ralign train` run from MLflow.

The page shows the run's summary (status, duration, tracking store), the config params, oracle metrics before and
after training, plots of every metric history the run logged (reward and components, KL and loss, oracle metrics
over evaluation steps, stage timings and throughput, pipeline ledger counts), and the evaluation / rollout image
grids from the start of training to its end. It needs nothing but the files in its directory (no JavaScript, no
external CSS), and is logged back to the run as the `report/` artefact directory.

Everything taken from the run is HTML-escaped, and any `user:password@` part of a URI is removed before it is shown.
Plots are drawn with matplotlib's Agg canvas through `Figure` objects (no pyplot, the global backend is untouched).
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ralign.ops.credentials import redact_credentials
from ralign.ops.model_registry import LOWER_IS_BETTER, metric_direction
from ralign.config import UserError
from ralign.ops.tracking import TrackingError, is_not_found, mlflow_message, resolve_tracking_uri, tracking_client

log = logging.getLogger(__name__)

REPORT_ARTIFACT_DIR = "report"
MAX_OTHER_PLOTS = 16
MAX_GRID_COLUMNS = 6  # evaluation / rollout grids shown per row: first, last and evenly spaced ones in between
# What a report directory may hold; anything else in --out means it is not ours (and must not be uploaded).
OWNED = ("index.html", "report.json", "plots", "eval", "rollouts")
TIMING_KEYS = ("wait_s", "learn_s", "iteration_s")
THROUGHPUT_KEYS = ("samples_per_s", "sampler_samples_per_s", "reward_samples_per_s", "learner_samples_per_s")
OPTIM_KEYS = ("kl", "loss", "policy_loss", "grad_norm")

_ITERATION_DIR = re.compile(r"iteration_(\d+)$")
_ROLLOUT_FILE = re.compile(r"rollouts_(\d+)\.png$")


def _e(text) -> str:
    """Scrubbed and HTML-escaped: the only way run data reaches the page."""
    return html.escape(redact_credentials(text), quote=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------------------------

def _get_run(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id or ""):
        raise TrackingError(f"{run_id!r} is not an MLflow run id")
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if is_not_found(exc):
            raise TrackingError(f"no MLflow run {run_id} at {redact_credentials(uri)}") from None
        raise TrackingError(f"cannot read run {run_id} at {redact_credentials(uri)}: {mlflow_message(exc)}") from None


def _histories(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history as sorted (step, value) pairs; a step logged twice keeps its latest value."""
    out = {}
    for key in sorted(keys):
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        out[key] = [(s, v) for s, (_, v) in sorted(by_step.items()) if v is not None and math.isfinite(v)]
    return out


def _artifact_paths(client, run_id: str, path: str | None = None) -> list:
    try:
        return list(client.list_artifacts(run_id, path))
    except Exception as exc:  # noqa: BLE001 - an unreadable artefact store: the page says the section is missing
        log.warning("cannot list artefacts %s of run %s: %s", path or "/", run_id, mlflow_message(exc))
        return []


def _download(client, run_id: str, path: str, dst: Path) -> Path | None:
    """Download one artefact file to `dst` (a file path); None if it cannot be read."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run_id, path, tmp))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dst)
        return dst
    except Exception as exc:  # noqa: BLE001 - a missing artefact is reported on the page, not raised
        log.warning("cannot download %s of run %s: %s", path, run_id, mlflow_message(exc))
        return None


def _read_json(client, run_id: str, path: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(client, run_id, path, Path(tmp) / Path(path).name)
        if local is None:
            return None
        try:
            data = json.loads(local.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("%s of run %s is not JSON: %s", path, run_id, exc)
            return None
    return data if isinstance(data, dict) else None


def _spread(items: list, k: int = MAX_GRID_COLUMNS) -> list:
    """At most k items: the first, the last and evenly spaced ones in between."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------

def _figure(n_axes: int, title: str, width: float = 9.0, height: float = 3.2, cols: int = 1):
    """A figure of `n_axes` axes in `cols` columns (unused cells hidden); integer steps on every x axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = max(1, min(cols, n_axes))
    rows = -(-n_axes // cols)
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_axes:]:
        ax.set_visible(False)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig, axes[:n_axes]


def _lines(ax, series: dict[str, list[tuple[int, float]]], ylabel: str, markers: bool = False, styles: dict | None = None) -> None:
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, marker="o" if markers or len(points) < 3 else None, markersize=4,
                linestyle=(styles or {}).get(name, "-"))
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small", loc="best", ncol=1 + len(series) // 8)


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    log.info("plotted %s", path.name)
    return path.name


def _plot_rewards(h: dict, plots: Path) -> str | None:
    means = {k: h[k] for k in ("reward_mean", "rollout_reward_mean") if h.get(k)}
    comps = {k: v for k, v in h.items() if v and (k.startswith("reward/") or k.startswith("rollout_reward/"))}
    if not means and not comps:
        return None
    groups = [(s, label) for s, label in ((means, "reward (mean)"), (comps, "component")) if s]
    fig, axes = _figure(len(groups), "Reward: training batches (solid), metrics rollouts (dashed)")
    for ax, (series, label) in zip(axes, groups):
        _lines(ax, series, label, styles={k: "--" for k in series if k.startswith("rollout_")})
    return _save(fig, plots / "rewards.png")


def _plot_optim(h: dict, plots: Path) -> str | None:
    present = [k for k in OPTIM_KEYS if h.get(k)]
    if not present:
        return None
    fig, axes = _figure(len(present), "KL and loss", height=2.8, cols=2)
    for ax, key in zip(axes, present):
        _lines(ax, {key: h[key]}, key)
    return _save(fig, plots / "kl_loss.png")


def _plot_oracle(h: dict, plots: Path) -> str | None:
    by_metric: dict[str, dict[str, list]] = {}
    for key, points in h.items():
        parts = key.split("/")
        if parts[0] != "oracle" or not points:
            continue
        metric, scope = (parts[-1], "/".join(parts[1:-1])) if len(parts) > 2 else (parts[1], "fidelity")
        by_metric.setdefault(metric, {})[scope] = points
    if not by_metric:
        return None
    order = ["all_correct"] + sorted(m for m in by_metric if m != "all_correct")
    metrics = [m for m in order if m in by_metric]
    fig, axes = _figure(len(metrics), "Oracle metrics on held-out prompts (step 0: before training)", height=2.8, cols=2)
    for ax, metric in zip(axes, metrics):
        series = dict(sorted(by_metric[metric].items(), key=lambda kv: (kv[0] != "overall", kv[0])))
        _lines(ax, series, metric, markers=True, styles={"overall": "-"} | {k: ":" for k in series if k != "overall"})
    return _save(fig, plots / "oracle.png")


def _plot_timings(h: dict, plots: Path) -> str | None:
    if not any(h.get(k) for k in TIMING_KEYS):
        return None
    fig, axes = _figure(2, "Stage timings per iteration")
    _lines(axes[0], {k: h[k] for k in TIMING_KEYS if h.get(k)}, "seconds")
    wait, learn, total = (dict(h.get(k, [])) for k in TIMING_KEYS)
    steps = sorted(set(wait) | set(learn) | set(total))
    if steps:
        w = [wait.get(s, 0.0) for s in steps]
        lrn = [learn.get(s, 0.0) for s in steps]
        other = [max(0.0, total.get(s, 0.0) - a - b) for s, a, b in zip(steps, w, lrn)]
        axes[1].stackplot(steps, w, lrn, other, labels=["wait for rollouts", "learn (update)", "other (publish, log)"], alpha=0.8)
        axes[1].set_xlabel("step (iteration)")
        axes[1].set_ylabel("seconds (stacked)")
        axes[1].legend(fontsize="small", loc="best")
        axes[1].grid(True, alpha=0.3)
    return _save(fig, plots / "timings.png")


def _plot_throughput(h: dict, plots: Path) -> str | None:
    series = {k: h[k] for k in THROUGHPUT_KEYS if h.get(k)}
    if not series:
        return None
    fig, axes = _figure(1, "Throughput per stage (samples/s; stages: of their actors' busy time)")
    _lines(axes[0], series, "samples / s")
    return _save(fig, plots / "throughput.png")


def _plot_other(h: dict, plots: Path, covered: set[str]) -> str | None:
    """Small multiples of every other metric (clip fraction, ratios, staleness, lr, ...)."""
    every = [k for k, v in h.items() if v and k not in covered and k not in ("iteration", "version")]
    if not every:
        return None
    keys = every[:MAX_OTHER_PLOTS]
    title = "Other metrics" + (f" (first {len(keys)} of {len(every)}; all in the table below)" if len(every) > len(keys) else "")
    fig, axes = _figure(len(keys), title, height=2.3, cols=2)
    for ax, key in zip(axes, keys):
        xs, ys = zip(*h[key])
        ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, markersize=4)
        ax.set_title(key, fontsize="small")
        ax.grid(True, alpha=0.3)
    return _save(fig, plots / "other.png")


def _plot_pipeline(h: dict, plots: Path) -> str | None:
    series = {k.removeprefix("pipeline/"): v for k, v in h.items() if k.startswith("pipeline/") and v}
    if not series:
        return None
    fig, axes = _figure(1, "Rollout pipeline ledger (cumulative sample counts)", height=3.8)
    _lines(axes[0], series, "samples")
    return _save(fig, plots / "pipeline.png")


# ---------------------------------------------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------------------------------------------

def _prompts_of(client, run_id: str, png_path: str) -> list[str]:
    """The prompts listed in the grid's .txt companion (written by `write_grid`), if logged."""
    txt = png_path.removesuffix(".png") + ".txt"
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(client, run_id, txt, Path(tmp) / "prompts.txt")
        if local is None:
            return []
        return local.read_text(encoding="utf-8", errors="replace").splitlines()


def _eval_grids(client, run_id: str, out: Path) -> tuple[list[int], dict[str, dict[int, dict]], int]:
    """Download the evaluation grids of the shown iterations. Returns (iterations shown, {family: {iteration:
    {"src", "prompts"}}}, number of evaluated iterations)."""
    iterations = {}
    for entry in _artifact_paths(client, run_id, "eval"):
        m = _ITERATION_DIR.search(entry.path)
        if entry.is_dir and m:
            iterations[int(m.group(1))] = entry.path
    shown = _spread(sorted(iterations))
    grids: dict[str, dict[int, dict]] = {}
    for it in shown:
        for entry in _artifact_paths(client, run_id, iterations[it]):
            name = Path(entry.path).name
            if entry.is_dir or not (name.startswith("grid_") and name.endswith(".png")):
                continue
            family = name.removeprefix("grid_").removesuffix(".png")
            rel = Path("eval") / f"iteration_{it:04d}" / name
            log.info("downloading %s", entry.path)
            if _download(client, run_id, entry.path, out / rel) is not None:
                grids.setdefault(family, {})[it] = {"src": rel.as_posix(), "prompts": _prompts_of(client, run_id, entry.path)}
    return shown, grids, len(iterations)


def _rollout_grids(client, run_id: str, out: Path) -> tuple[list[dict], int]:
    files = {}
    for entry in _artifact_paths(client, run_id, "rollouts"):
        m = _ROLLOUT_FILE.search(entry.path)
        if not entry.is_dir and m:
            files[int(m.group(1))] = entry.path
    shown = []
    for it in _spread(sorted(files)):
        rel = Path("rollouts") / Path(files[it]).name
        log.info("downloading %s", files[it])
        if _download(client, run_id, files[it], out / rel) is not None:
            shown.append({"iteration": it, "src": rel.as_posix(), "prompts": _prompts_of(client, run_id, files[it])})
    return shown, len(files)


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #1a7f37; } td.down, p.down { color: #b42318; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
table.grids img { max-width: 260px; image-rendering: pixelated; }
p.missing { color: #8a5300; background: #fff8e6; border-left: 4px solid #e0a800; padding: .4em .8em; }
details { font-size: .85em; } details pre { white-space: pre-wrap; max-width: 260px; }
.params { max-height: 30em; overflow: auto; display: inline-block; }
"""


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return _e(value)


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """`header` is escaped here; `rows` cells must already be HTML (escaped by the caller)."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _plot_section(title: str, src: str | None, absent: str) -> str:
    if src is None:
        return f"<h2>{_e(title)}</h2>{_missing(absent)}"
    return f'<h2>{_e(title)}</h2><img class="plot" src="plots/{_e(src)}" alt="{_e(title)}">'


def _numeric_leaves(node, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out[prefix.rstrip(".")] = float(node)
    return out


def _change_table(before: dict | None, after: dict | None, h: dict) -> str:
    """The paired all-correct change per family (same prompts and noise before and after) with its 95 % interval,
    and the reward-hacking verdict: training reward up while held-out all-correct fell."""
    from ralign.world.stats import compare_evaluations, reward_hacking, verdict

    if not before or not after or "per_prompt" not in before or "per_prompt" not in after:
        return ""
    change = compare_evaluations(before, after)
    rewards = [v for _, v in h.get("reward_mean", [])]
    k = max(1, len(rewards) // 10)
    first, last = (sum(rewards[:k]) / k, sum(rewards[-k:]) / k) if rewards else (None, None)
    hacked = reward_hacking(first, last, change)
    rows = []
    for scope, c in [*change["families"].items(), ("overall", change["overall"])]:
        word = verdict(c)
        cls = "num up" if word == "better" else "num down" if word == "worse" else "num"
        rows.append([f"<th>{_e(scope)}</th>", f'<td class="num">{c["before"]:.3f}</td>', f'<td class="num">{c["after"]:.3f}</td>',
                     f'<td class="{cls}">{c["diff"]:+.3f} [{c["ci"][0]:+.3f}, {c["ci"][1]:+.3f}]</td>', _e(word),
                     f'<td class="num">{c["n"]}</td>'])
    flag = ""
    if hacked:
        flag = (f'<p class="down"><b>Reward hacking:</b> the training reward rose ({first:.4f} → {last:.4f}) while held-out '
                f'all-correct fell on {_e(", ".join(hacked))} (interval below zero).</p>')
    note = ("<p>All-correct before → after on the same held-out prompts with the same noise; the change's 95 % interval "
            "is a paired bootstrap over prompts. A change is called better or worse only when its interval excludes 0.</p>")
    return flag + note + _table(["", "before", "after", "change [95% interval]", "verdict", "n"], rows)


def _oracle_table(before: dict | None, after: dict | None) -> str:
    if before is None and after is None:
        return _missing("No oracle_before.json / oracle_after.json: the run was not evaluated before and after "
                        "training (train.eval.before_after=false), or has not finished.")
    notes = []
    if before is None:
        notes.append(_missing("No oracle_before.json (no evaluation before training)."))
    if after is None:
        notes.append(_missing("No oracle_after.json (no evaluation after training: unfinished run?)."))
    scopes = [("overall", "overall")] + [(f"families.{f}", f) for f in ((after or before).get("families") or {})]
    scopes += [(k, k) for k in ("fidelity", "unseen_combos") if k in (after or {}) or k in (before or {})]
    values = {label: (_numeric_leaves(_dig(before, key)), _numeric_leaves(_dig(after, key))) for key, label in scopes}
    metrics = list(dict.fromkeys(m for b, a in values.values() for m in (*a, *b)))
    rows = []
    for label, (b, a) in values.items():
        cells = [f"<th>{_e(label)}</th>"]
        for metric in metrics:
            vb, va = b.get(metric), a.get(metric)
            if vb is None and va is None:
                cells.append("<td></td>")
                continue
            cls = "num"
            if vb is not None and va is not None and va != vb and metric != "n":
                better = (va > vb) == (metric_direction(metric) == "higher")
                cls += " up" if better else " down"
            text = _fmt(va if vb is None else vb) if vb is None or va is None or vb == va else f"{_fmt(vb)} → {_fmt(va)}"
            cells.append(f'<td class="{cls}">{text}</td>')
        rows.append(cells)
    meta = []
    for k in ("split", "n_per_family", "seed"):
        src = after if after and k in after else before
        if src and k in src:
            meta.append(f"{_e(k)} = {_e(src[k])}")
    head = f"<p>Held-out evaluation set: {', '.join(meta)}.</p>" if meta else ""
    legend = ("<p>Cells: before → after (one value when unchanged or only one side exists); green: better, red: worse "
              "(lower is better for " + ", ".join(LOWER_IS_BETTER) + ").</p>")
    return head + "".join(notes) + legend + _table(["", *metrics], rows)


def _dig(node, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _prompts_html(prompts: list[str]) -> str:
    if not prompts:
        return ""
    return f"<details><summary>prompts ({len(prompts)})</summary><pre>{_e(chr(10).join(prompts))}</pre></details>"


def _grids_html(shown: list[int], grids: dict, total: int, final_step: int | None) -> str:
    if not grids:
        return _missing("No evaluation grids logged (train.eval.before_after=false and train.eval.every=0, or the "
                        "run has not reached an evaluation yet).")

    def label(it: int) -> str:
        if it == 0:
            return "iteration 0 (before training)"
        return f"iteration {it}" + (" (end)" if final_step is not None and it == final_step else "")

    note = f"<p>{len(shown)} of {total} evaluated iterations shown.</p>" if total > len(shown) else ""
    rows = []
    for family in sorted(grids):
        cells = [f"<th>{_e(family)}</th>"]
        for it in shown:
            g = grids[family].get(it)
            cells.append(f'<td><img src="{_e(g["src"])}" alt="{_e(family)} at iteration {it}">{_prompts_html(g["prompts"])}</td>'
                         if g else "<td>–</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<th>family</th>" + "".join(f"<th>{_e(label(it))}</th>" for it in shown)
    return (note + "<p>Frames: green where the oracle judges the image all-correct, red elsewhere.</p>"
            f'<table class="grids"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _rollouts_html(shown: list[dict], total: int) -> str:
    if not shown:
        return _missing("No rollout grids logged (tracking.log_images_every=0, or the algorithm's batches carry no images).")
    note = f"<p>{len(shown)} of {total} logged rollout grids shown.</p>" if total > len(shown) else ""
    head = "".join(f"<th>iteration {r['iteration']}</th>" for r in shown)
    cells = "".join(f'<td><img src="{_e(r["src"])}" alt="rollouts at iteration {r["iteration"]}">{_prompts_html(r["prompts"])}</td>'
                    for r in shown)
    return note + f'<table class="grids"><thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table>'


def _ms_to_text(ms: int | None) -> str:
    if not ms:
        return "–"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(start: int | None, end: int | None) -> str:
    if not start:
        return "–"
    seconds = max(0, ((end or int(time.time() * 1000)) - start) // 1000)
    text = f"{seconds // 3600}h {seconds % 3600 // 60:02d}m {seconds % 60:02d}s" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"
    return text if end else text + " so far (run not ended)"


def _final_values(h: dict) -> str:
    rows = [[_e(k), f'<td class="num">{_fmt(v[-1][1])}</td>', f'<td class="num">{v[-1][0]}</td>', f'<td class="num">{len(v)}</td>']
            for k, v in h.items() if v]
    if not rows:
        return _missing("The run logged no metrics.")
    return _table(["metric", "last value", "at step", "points"], rows)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

def _prepare_out_dir(out: Path) -> None:
    """Create `out`, or clear an earlier report in it; refuse a directory holding anything else (it would be
    uploaded to the run with the report)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
    if foreign:
        raise UserError(f"--out {out} holds files that are not part of a report ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); use an empty or new directory")
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def build_report(run_id: str, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 log_to_run: bool = True) -> Path:
    """Write the report of MLflow run `run_id` to `out_dir` (default outputs/report/RUN_ID) and return the path
    of its index.html; unless `log_to_run` is False, also log the directory to the run as `report/`.
    Raises ValueError (one line) for a missing store or run, or an `out_dir` holding other files."""
    uri = resolve_tracking_uri(tracking_uri)
    client = tracking_client(uri)  # a RegistryError (ValueError) for a sqlite store that does not exist
    run = _get_run(client, run_id, uri)
    out = Path(out_dir) if out_dir is not None else Path("outputs") / "report" / run_id
    _prepare_out_dir(out)
    plots = out / "plots"
    log.info("report of run %s at %s -> %s", run_id, redact_credentials(uri), out)

    log.info("reading %d metric histories", len(run.data.metrics))
    h = _histories(client, run_id, run.data.metrics.keys())
    top = {a.path for a in _artifact_paths(client, run_id)}
    oracle = {name: (_read_json(client, run_id, f"{name}.json") if f"{name}.json" in top else None)
              for name in ("oracle_before", "oracle_after", "oracle_pretrained")}
    ledger = _read_json(client, run_id, "pipeline_ledger.json") if "pipeline_ledger.json" in top else None

    algorithm = run.data.tags.get("ralign.algorithm") or run.data.params.get("algorithm.name") or "?"
    produced = {
        "rewards": _plot_rewards(h, plots),
        "kl_loss": _plot_optim(h, plots),
        "oracle": _plot_oracle(h, plots),
        "timings": _plot_timings(h, plots),
        "throughput": _plot_throughput(h, plots),
        "pipeline": _plot_pipeline(h, plots),
    }
    covered = {k for k in h if k in (*OPTIM_KEYS, *TIMING_KEYS, *THROUGHPUT_KEYS, "reward_mean", "rollout_reward_mean")
               or k.split("/")[0] in ("reward", "rollout_reward", "oracle", "pipeline")}
    produced["other"] = _plot_other(h, plots, covered)
    iteration_steps = [s for s, _ in h.get("iteration", [])]
    final_step = max(iteration_steps) if iteration_steps else None
    shown, grids, n_evals = _eval_grids(client, run_id, out)
    rollouts, n_rollouts = _rollout_grids(client, run_id, out)

    missing = []
    if not h.get("kl"):
        missing.append(f"No KL logged: {algorithm} has no KL term (only DPOK logs `kl`).")
    body = [f"<h1>ralign run {_e(run.info.run_name or run_id)}</h1>"]

    info = run.info
    experiment = None
    try:
        experiment = client.get_experiment(info.experiment_id).name
    except Exception:  # noqa: BLE001 - only a label on the page
        pass
    summary = [
        ("run id", run_id), ("run name", info.run_name), ("experiment", experiment), ("status", info.status),
        ("algorithm", algorithm), ("reward", run.data.params.get("reward.name")),
        ("iterations logged", f"{final_step} of {run.data.params.get('train.iterations', '?')}" if final_step is not None else "none"),
        ("started", _ms_to_text(info.start_time)), ("ended", _ms_to_text(info.end_time)),
        ("duration", _duration(info.start_time, info.end_time)),
        ("tracking URI", redact_credentials(uri)), ("artefact URI", redact_credentials(info.artifact_uri or "")),
    ]
    summary += [(k, v) for k, v in sorted(run.data.tags.items()) if k.startswith("ralign.") and k != "ralign.algorithm"]
    body.append("<h2>Summary</h2>" + _table(None, [[f"<th>{_e(k)}</th>", _e(v if v is not None else "–")] for k, v in summary]))

    body.append("<h2>Oracle before / after training</h2>" + _change_table(oracle["oracle_before"], oracle["oracle_after"], h)
                + _oracle_table(oracle["oracle_before"], oracle["oracle_after"]))
    if oracle["oracle_pretrained"]:  # the run started from an earlier stage (model.init_checkpoint)
        body.append("<h2>Against the pretrained model</h2><p>The run started from an earlier stage; here its model after "
                    "training is compared with the pretrained model it was built on, on the same prompts and noise.</p>"
                    + _change_table(oracle["oracle_pretrained"], oracle["oracle_after"], h))
    body.append(_plot_section("Reward and components", produced["rewards"], "No reward metrics logged."))
    optim = _plot_section("KL and loss", produced["kl_loss"], "No KL or loss metrics logged.")
    body.append(optim + "".join(_missing(m) for m in missing))
    body.append(_plot_section("Oracle metrics over training", produced["oracle"],
                              "No oracle metrics logged (evaluation off: train.eval.before_after=false and train.eval.every=0)."))
    body.append(_plot_section("Stage timings", produced["timings"], "No stage timings logged."))
    body.append(_plot_section("Throughput", produced["throughput"], "No throughput metrics logged."))
    body.append(_plot_section("Pipeline ledger counts", produced["pipeline"], "No pipeline ledger counts logged."))
    if ledger is not None:
        flat = {k: v for k, v in ledger.items() if not isinstance(v, (dict, list))}
        body.append("<h3>Final ledger (pipeline_ledger.json)</h3>" + _table(["count", "value"], [[_e(k), f'<td class="num">{_fmt(v)}</td>'] for k, v in flat.items()]))
    else:
        body.append(_missing("No pipeline_ledger.json (the run has not ended, or predates the ledger)."))
    if produced["other"]:
        body.append(_plot_section("Other metrics", produced["other"], ""))
    body.append("<h2>Evaluation grids, start → end</h2>" + _grids_html(shown, grids, n_evals, final_step))
    body.append("<h2>Rollout grids</h2>" + _rollouts_html(rollouts, n_rollouts))
    body.append("<h2>Final metric values</h2>" + _final_values(h))
    params = sorted(run.data.params.items())
    body.append("<h2>Config (params)</h2>" + (f'<div class="params">{_table(["param", "value"], [[_e(k), _e(v)] for k, v in params])}</div>'
                                              if params else _missing("The run has no params.")))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    body.append(f"<p><small>Generated by <code>ralign report</code> at {generated}.</small></p>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ralign report {_e(run_id)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    (out / "report.json").write_text(json.dumps({
        "run_id": run_id, "generated": generated, "plots": {k: v for k, v in produced.items() if v},
        "eval_iterations": shown, "eval_families": sorted(grids), "rollout_iterations": [r["iteration"] for r in rollouts],
    }, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", index)
    if log_to_run:
        log.info("logging the report to run %s as %s/", run_id, REPORT_ARTIFACT_DIR)
        client.log_artifacts(run_id, str(out), REPORT_ARTIFACT_DIR)
    return index
