"""The `ralign` command line on tiny settings: the installed entry point once as a subprocess, the verbs through the
console script's own `main` in this process (a subprocess each would spend seconds importing torch)."""

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


def test_render_writes_images_and_index(ralign_cli, tmp_path):
    assert ralign_cli("world", "render", "--family", "binding", "--n", "3", "--out", str(tmp_path)).code == 0
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    assert all(" and " in r["prompt"] for r in rows)


def test_bad_arguments_are_one_line_errors(ralign_cli, tmp_path):
    outcome = ralign_cli("world", "render", "--family", "nonsense", "--out", str(tmp_path))
    assert outcome.code == 2
    assert outcome.err.strip().startswith("error: unknown prompt family 'nonsense'")
    assert len(outcome.err.strip().splitlines()) == 1
    outcome = ralign_cli("eval", "--pipeline", str(tmp_path / "nowhere"))
    assert outcome.code == 2 and "no such directory" in outcome.err
    assert "Traceback" not in outcome.err
    outcome = ralign_cli("world", "pretrain", "--out", str(tmp_path), "--only", "detector", "--detector-stride", "5")
    assert outcome.code == 2 and "must be one of (4, 8), got 5" in outcome.err and not (tmp_path / "detector").exists()


def test_oracle_check_json_shape(ralign_cli, tmp_path):
    out = tmp_path / "oracle.json"
    assert ralign_cli("world", "oracle-check", "--n", "5", "--json", str(out)).code == 0
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"single", "binding", "counting", "spatial", "size", "long"}
    for metrics in report["families"].values():
        assert METRIC_KEYS <= set(metrics)
        assert metrics["all_correct"] == 1.0


def test_eval_tiny_run_writes_metrics_and_grids(ralign_cli, tmp_path):
    out = tmp_path / "eval.json"
    outcome = ralign_cli("eval", "--pipeline", "base", "--n", "2", "--steps", "2", "--families", "single,spatial", "--json", str(out))
    assert outcome.code == 0, outcome.err[-3000:]
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"single", "spatial"}
    assert report["families"]["single"]["spatial_acc"] is None
    assert METRIC_KEYS <= set(report["families"]["spatial"])
    assert {"kid", "artifact_rate"} <= set(report["fidelity"])
    assert (tmp_path / "eval_grids" / "grid_single.png").is_file()

    # --against: the same prompts and noise again, paired with the first report; the same model changes nothing.
    again = ralign_cli("eval", "--pipeline", "base", "--steps", "2", "--against", str(out), "--json", str(tmp_path / "again.json"))
    assert again.code == 0, again.err[-3000:]
    change = json.loads((tmp_path / "again.json").read_text())["change_against"]
    assert list(change["families"]) == ["single", "spatial"]
    assert change["overall"]["n"] == 4 and change["overall"]["diff"] == 0.0
    assert "paired 95% interval" in again.out
    # A `ralign train --json` summary stands for its before-training evaluation.
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "oracle_before": report, "oracle_after": report}))
    from_run = ralign_cli("eval", "--pipeline", "base", "--steps", "2", "--against", str(tmp_path / "run.json"))
    assert from_run.code == 0 and "overall  " in from_run.out, from_run.err[-3000:]
    clash = ralign_cli("eval", "--pipeline", "base", "--n", "3", "--against", str(out))
    assert clash.code == 2 and "fixes the prompts and noise; drop or change --n 3 (it has 2)" in clash.err
    assert len(clash.err.strip().splitlines()) == 1
    (tmp_path / "other.json").write_text(json.dumps({"families": {}}))
    wrong = ralign_cli("eval", "--pipeline", "base", "--against", str(tmp_path / "other.json"))
    assert wrong.code == 2 and "neither a `ralign eval --json` report" in wrong.err
    single = ralign_cli("eval", "--pipeline", "base", "--n", "1", "--families", "single", "--json", str(tmp_path / "one.json"))
    assert single.code == 2 and "KID) needs at least 2" in single.err and len(single.err.strip().splitlines()) == 1
    assert not (tmp_path / "one.json").exists()
