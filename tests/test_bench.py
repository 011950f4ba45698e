"""`ralign bench` on tiny settings: each benchmark runs end to end and writes well-formed JSON (no timing assertions:
the numbers themselves live in benchmarks/results/, measured on a quiet machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

TINY = str(Path(__file__).parent / "configs" / "tiny_train.yaml")


def _ralign(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_memory_tiny(ralign_cli_inprocess, tmp_path):
    out = tmp_path / "memory.json"
    # In this process: each row runs in a child process of its own anyway (its peak RSS is the row's figure).
    result = ralign_cli_inprocess("bench", "memory", "--config", TINY, "--k", "1,3", "--set", "train.micro_batch=1",
                                  "--set", "train.batch_size=2", "--set", "ray.request_batch=2", "--json", str(out))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "memory" and result["chain_steps"] == 3 and {"cpus", "torch"} <= set(result["machine"])
    assert [(r["k"], r["checkpointing"]) for r in result["rows"]] == [(1, True), (3, True), (1, False), (3, False)]
    for row in result["rows"]:
        assert "error" not in row, row
        assert _finite(row["step_s"]) and row["step_s"] > 0 and row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0
    assert set(result["growth_exponent"]) == {"checkpointing", "no_checkpointing"}


def test_bench_pipeline_tiny(ralign_cli_inprocess, tmp_path):
    out = tmp_path / "pipeline.json"
    # In this process, on the suite's Ray cluster (the other benchmarks start processes or a cluster of their own).
    result = ralign_cli_inprocess("bench", "pipeline", "--config", TINY, "--iterations", "1", "--warmup", "1", "--json", str(out))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    result = json.loads(out.read_text())
    assert set(result["samples_per_s"]) == {"sample_stage", "reward_stage", "learn_stage", "sequential", "pipeline"}
    assert all(_finite(v) and v > 0 for v in result["samples_per_s"].values())
    for key in ("ratio_pipeline_vs_sequential", "ratio_iteration_vs_slowest_stage", "ray_overhead_fraction"):
        assert _finite(result[key]) and result[key] > 0, key
    assert {"learner", "sampler", "reward"} <= set(result["wait_s"])
    assert {"in_process", "driver", "SamplerActor", "RewardActor"} <= set(result["peak_rss_mb"])
    assert result["ledger"]["balanced"]


def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "scale.json"
    _ralign("bench", "scale", "--config", TINY, "--samplers", "1,2", "--requests", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert [r["samplers"] for r in result["rows"]] == [1, 2] and result["rows"][0]["speedup"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["weight_broadcast_s"] > 0 and r["weights_mb"] > 0 for r in result["rows"])
    assert result["scaling_stops_at_samplers"] in (1, 2)
