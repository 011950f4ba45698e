"""`ralign report`: the HTML page of a run, built from a synthetic MLflow run in a sqlite store (no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from ralign.ops.report import build_report

SECRET_URI = "http://user:pw@mlflow.example:5000"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[MlflowClient, str, str]:
    """One sqlite store for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("report-test", artifact_location=(root / "artifacts").as_uri())
    return client, uri, exp


def _oracle(all_correct: float, kid: float) -> dict:
    fam = {"n": 2, "object_recall": 0.5, "all_correct": all_correct, "spatial_acc": None}
    return {"families": {"single": fam}, "overall": dict(fam), "fidelity": {"kid": kid}, "split": "test", "n_per_family": 2, "seed": 0}


def _dpok_like_run(store, tmp_path: Path) -> tuple[MlflowClient, str, str]:
    client, uri, exp = store
    run_id = client.create_run(exp, run_name="dpok-<b>colour</b>").info.run_id
    metrics = []
    for step in (1, 2, 3):
        metrics += [Metric("iteration", step, step, step), Metric("reward_mean", 0.1 * step, step, step),
                    Metric("reward/x", 0.2 * step, step, step), Metric("kl", 0.01 * step, step, step),
                    Metric("loss", 1.0 / step, step, step), Metric("learn_s", 0.5, step, step),
                    Metric("wait_s", 0.1, step, step), Metric("iteration_s", 0.7, step, step),
                    Metric("samples_per_s", 5.0, step, step), Metric("pipeline/issued", 4.0 * step, step, step),
                    Metric("staleness", 0.0, step, step)]
    for step, value in ((0, 0.25), (3, 0.75)):
        metrics += [Metric("oracle/overall/all_correct", value, 10 + step, step), Metric("oracle/single/all_correct", value, 10 + step, step)]
    client.log_batch(run_id, metrics=metrics, params=[
        Param("algorithm.name", "dpok"), Param("train.iterations", "3"),
        Param("note", "<script>alert(1)</script>"), Param("tracking.tracking_uri", SECRET_URI),
    ])
    client.set_tag(run_id, "ralign.algorithm", "dpok")
    src = tmp_path / "src"
    for it, colour in ((0, (200, 0, 0)), (3, (0, 200, 0))):
        grid = src / f"iteration_{it:04d}"
        grid.mkdir(parents=True)
        Image.fromarray(np.full((8, 16, 3), colour, np.uint8)).save(grid / "grid_single.png")
        (grid / "grid_single.txt").write_text(" 0 a <red> square\n", encoding="utf-8")
        client.log_artifacts(run_id, str(grid), f"eval/iteration_{it:04d}")
    for name, report in (("oracle_before", _oracle(0.25, 12.0)), ("oracle_after", _oracle(0.75, 9.0))):
        client.log_dict(run_id, report, f"{name}.json")
    client.log_dict(run_id, {"issued": 12, "lost": 0, "balanced": True}, "pipeline_ledger.json")
    client.set_terminated(run_id, status="FINISHED")
    return client, uri, run_id


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def test_report_page_of_a_run(store, tmp_path):
    client, uri, run_id = _dpok_like_run(store, tmp_path)
    index = build_report(run_id, tracking_uri=uri, out_dir=tmp_path / "report")
    page = index.read_text(encoding="utf-8")
    srcs = _images(page)
    assert srcs and all((index.parent / s).is_file() for s in srcs)  # every referenced PNG is next to the page
    assert not re.search(r'(src|href)="(?!plots/|eval/|rollouts/)', page) and "<script" not in page  # self-contained, no JS
    for plot in ("rewards", "kl_loss", "oracle", "timings", "throughput", "pipeline", "other"):
        assert f"plots/{plot}.png" in srcs, plot
    assert "No KL logged" not in page
    # Evaluation grids start -> end, in that order, with their prompts escaped.
    start, end = page.index("eval/iteration_0000/grid_single.png"), page.index("eval/iteration_0003/grid_single.png")
    assert start < end and "iteration 0 (before training)" in page and "iteration 3 (end)" in page
    assert "a &lt;red&gt; square" in page
    assert "No rollout grids logged" in page  # stated, not an error
    # Oracle before / after table (kid: lower is better, so its drop is marked as an improvement).
    assert "0.25 → 0.75" in page and '<td class="num up">12 → 9</td>' in page
    # Run data is escaped; credentials in URIs are removed.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "dpok-&lt;b&gt;colour&lt;/b&gt;" in page
    assert "user:pw" not in page and "http://***@mlflow.example:5000" in page
    # Logged back to the run as report/.
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/index.html", "report/plots", "report/eval"} <= logged
    assert json.loads((index.parent / "report.json").read_text())["eval_iterations"] == [0, 3]


def test_missing_pieces_are_stated_and_bad_input_raises(store, tmp_path):
    client, uri, exp = store
    run_id = client.create_run(exp).info.run_id
    client.log_batch(run_id, metrics=[Metric("reward_mean", 0.5, 0, 1), Metric("loss", 0.1, 0, 1)],
                     params=[Param("algorithm.name", "refl")])
    from typer.testing import CliRunner

    from jobs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", run_id, "--tracking-uri", uri, "--out", str(out), "--no-log"])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "No KL logged: refl" in page and "No evaluation grids logged" in page and "No oracle_before.json" in page
    assert "No stage timings logged" in page and "so far (run not ended)" in page
    assert client.list_artifacts(run_id, "report") == []  # --no-log
    build_report(run_id, tracking_uri=uri, out_dir=out, log_to_run=False)  # an earlier report in --out is replaced

    (tmp_path / "mine.txt").write_text("not a report")
    with pytest.raises(ValueError, match="not part of a report"):  # nothing foreign gets uploaded with the report
        build_report(run_id, tracking_uri=uri, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no MLflow run 0123abcd at"):
        build_report("0123abcd", tracking_uri=uri, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="no MLflow store"):
        build_report(run_id, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", out_dir=tmp_path / "x")


def test_a_run_whose_reward_rose_while_the_oracle_fell_is_flagged(store, tmp_path):
    """A synthetic run: the training reward climbs, held-out binding falls on every one of 40 prompts; the page
    shows the paired change with its interval and names the family as reward hacking."""
    client, uri, exp = store
    run_id = client.create_run(exp, run_name="hacked").info.run_id
    client.log_batch(run_id, metrics=[Metric("reward_mean", 0.5 + 0.1 * s, s, s) for s in range(1, 11)])
    prompts = {"single": [f"a red circle {i}" for i in range(40)], "binding": [f"a red circle and a blue square {i}" for i in range(40)]}

    def report(single: float, binding: float) -> dict:
        per_prompt = {f: {"prompts": prompts[f], "all_correct": [v] * 40, "object_recall": [v] * 40}
                      for f, v in (("single", single), ("binding", binding))}
        fams = {f: {"n": 40, "all_correct": v} for f, v in (("single", single), ("binding", binding))}
        return {"families": fams, "overall": {"n": 80, "all_correct": (single + binding) / 2}, "per_prompt": per_prompt}

    client.log_dict(run_id, report(1.0, 1.0), "oracle_before.json")
    client.log_dict(run_id, report(1.0, 0.0), "oracle_after.json")
    client.set_terminated(run_id, status="FINISHED")
    page = build_report(run_id, tracking_uri=uri, out_dir=tmp_path / "r", log_to_run=False).read_text()
    assert "Reward hacking:" in page and "all-correct fell on binding" in page
    assert "-1.000 [-1.000, -1.000]" in page and "worse" in page and "no clear change" in page


def test_no_flag_when_the_oracle_held():
    from ralign.world.stats import reward_hacking

    change = {"families": {"binding": {"ci": [-0.05, 0.02]}, "single": {"ci": [-0.2, -0.01]}}}
    assert reward_hacking(0.5, 0.6, change) == ["single"]  # binding's interval holds 0
    assert reward_hacking(0.6, 0.5, change) == []  # the reward did not rise: a bad run, not a hacked reward
