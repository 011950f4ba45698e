"""`ralign diagnose reward` on a tiny pipeline: the rates by hand on known rankings, the whole verb end to end, and
bad input refused in one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.diagnose import family_summary
from ralign.world.stats import pairwise_accuracy


def test_family_rates_by_hand():
    rewards = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.3, 0.3, 0.1]])
    correct = np.array([[True, False, False], [True, False, False], [False, False, False]])
    s = family_summary(rewards, correct)
    assert s["random"]["rate"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3, abs=1e-4)
    assert s["reward_best_of_n"]["rate"] == pytest.approx(1 / 3, abs=1e-4)  # right on prompt 0 only
    assert s["oracle_best_of_n"]["rate"] == pytest.approx(2 / 3, abs=1e-4)
    # prompt 0: correct 0.9 beats both; prompt 1: correct 0.2 loses to both; prompt 2 has no pairs
    assert s["pairwise_accuracy"]["rate"] == pytest.approx(0.5) and s["pairwise_accuracy"]["pairs"] == 4
    assert pairwise_accuracy([0.5, 0.5], [True, False]) == (0.5, 1)  # a tie counts half
    lo, hi = s["random"]["ci"]
    assert 0 <= lo <= s["random"]["rate"] <= hi <= 1
    assert "verdict_agreement" not in s  # a reward without a verdict of its own
    # a reward's own verdicts, agreeing with the oracle on 2, 2 and 1 of the 3 images of each prompt
    verdicts = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    assert family_summary(rewards, correct, verdicts)["verdict_agreement"]["rate"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3, abs=1e-4)


def test_diagnose_on_a_tiny_pipeline(ralign_cli_inprocess, tmp_path):
    out = tmp_path / "d.json"
    result = ralign_cli_inprocess("diagnose", "reward", "--reward", "colorfulness", "--pipeline", "tiny-random",
                                  "--families", "single,binding", "--prompts", "2", "--samples", "2", "--json", str(out),
                                  "--markdown", str(tmp_path / "d.md"))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"single", "binding"}
    for fam in report["families"].values():
        assert fam["prompts"] == 2 and fam["samples_per_prompt"] == 2
        assert fam["oracle_best_of_n"]["rate"] >= fam["reward_best_of_n"]["rate"]
    assert "| single | 2 × 2 |" in (tmp_path / "d.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--reward", "colorfulness", "--samples", "1"], "at least 2 images per prompt"),
    (["--reward", "colorfulness", "--families", ""], "--families is empty"),
    (["--reward", "grounded_attention"], "cross-attention or latents"),
    (["--reward", "nope"], "not a known reward"),
    (["--reward", "colorfulness", "--options", "{bad"], "--options is not JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(ralign_cli_inprocess, tmp_path, args, message):
    out = tmp_path / "d.json"
    result = ralign_cli_inprocess("diagnose", "reward", "--pipeline", "tiny-random", "--prompts", "1", *args, "--json", str(out))
    assert result.exit_code != 0 and message in str(result.exception), result.output
    assert not out.exists()


def test_a_checkpoint_of_another_base_model_is_refused(ralign_cli_inprocess, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "learner_state.json").write_text(json.dumps({"policy_spec": {"pipeline": "base", "policy": {}}}))
    result = ralign_cli_inprocess("diagnose", "reward", "--reward", "colorfulness", "--pipeline", "tiny-random",
                                  "--checkpoint", str(tmp_path / "ckpt"), "--json", str(tmp_path / "d.json"))
    assert result.exit_code != 0 and "trained on base model 'base', not --pipeline 'tiny-random'" in str(result.exception)
    assert not (tmp_path / "d.json").exists()
