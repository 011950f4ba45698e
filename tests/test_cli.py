"""The `ralign` command line, run as a user runs it (a subprocess), on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

METRIC_KEYS = {"n", "object_recall", "binding_acc", "count_acc", "spatial_acc", "all_correct", "artifact_rate"}


def ralign(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


VERBS = [[], ["world"], ["world", "render"], ["world", "oracle-check"], ["world", "pretrain"], ["eval"], ["generate"], ["sft"],
         ["compare"], ["train"], ["promote"], ["serve"], ["submit"], ["status"], ["stop"], ["logs"], ["k8s"], ["k8s", "render"],
         ["k8s", "validate"], ["report"], ["diagnose"], ["diagnose", "reward"], ["export"], ["bench"], ["bench", "memory"], ["bench", "pipeline"], ["bench", "scale"]]


def test_help_on_every_verb():
    assert "Usage" in ralign("--help").stdout  # the real entry point, once
    from typer.testing import CliRunner

    from jobs.cli import app

    runner = CliRunner()
    for verb in VERBS:  # every verb's help, in-process (a subprocess each would cost seconds of imports)
        result = runner.invoke(app, [*verb, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (verb, result.output[-500:])


def test_render_writes_images_and_index(tmp_path):
    ralign("world", "render", "--family", "binding", "--n", "3", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    assert all(" and " in r["prompt"] for r in rows)


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = ralign("world", "render", "--family", "nonsense", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown prompt family 'nonsense'")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = ralign("eval", "--pipeline", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_oracle_check_json_shape(tmp_path):
    out = tmp_path / "oracle.json"
    ralign("world", "oracle-check", "--n", "5", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"single", "binding", "counting", "spatial", "size", "long"}
    for metrics in report["families"].values():
        assert METRIC_KEYS <= set(metrics)
        assert metrics["all_correct"] == 1.0


def test_eval_tiny_run_writes_metrics_and_grids(tmp_path):
    out = tmp_path / "eval.json"
    ralign("eval", "--pipeline", "base", "--n", "2", "--steps", "2", "--families", "single,spatial", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"single", "spatial"}
    assert report["families"]["single"]["spatial_acc"] is None
    assert METRIC_KEYS <= set(report["families"]["spatial"])
    assert {"kid", "artifact_rate"} <= set(report["fidelity"])
    assert (tmp_path / "eval_grids" / "grid_single.png").is_file()
