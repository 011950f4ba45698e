"""`ralign compare` on tiny settings: the base row and one trained method (CoMat, through the real Ray engine with
its concept-matching (soft detector), grounded-attention and discriminator terms, scored in the learner and in a reward actor), the JSON shape the issue fixes, Markdown, grids, montages,
and reuse of unchanged rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ralign.world.prompts import FAMILIES


def test_compare_base_and_comat_tiny(ralign_cli_inprocess, tmp_path, monkeypatch, caplog):
    # In this process, on the suite's Ray cluster: a subprocess per run would spend its start-up importing what the
    # suite has imported. The working directory is the user's, as a subprocess with cwd=tmp_path had it.
    monkeypatch.chdir(tmp_path)
    out, js = tmp_path / "out", tmp_path / "compare.json"
    args = ["compare", "--methods", "base,flow_base,comat", "--n", "1", "--out", str(out), "--json", str(js),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", "train.iterations=1", "--set", "train.batch_size=8", "--set", "train.micro_batch=4",
            "--set", "ray.request_batch=4", "--set", f"ray.storage_path={tmp_path / 'ray'}", "--set", "ray.num_cpus=2",
            # request 1 is then a metrics rollout, issued before request 2 that the learner trains on
            "--set", "ray.metric_rollout_every=2"]
    result = ralign_cli_inprocess(*args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    results = json.loads(js.read_text())
    assert set(results) >= {"machine", "rows"} and set(results["rows"]) == {"base", "flow_base", "comat"}
    for method, row in results["rows"].items():
        assert set(row["families"]) == set(FAMILIES)
        assert {"all_correct", "object_recall"} <= set(row["families"]["binding"])
        assert {"kid", "artifact_rate"} <= set(row["fidelity"]) and row["wall_s"] > 0
    assert results["rows"]["base"]["train_reward"] is None
    # the flow model's base row: its own model at its own sampler (the 40-step ODE), its own grids
    assert results["rows"]["flow_base"]["config_digest"] != results["rows"]["base"]["config_digest"]
    assert (out / "grids" / "flow_base" / "grid_binding.png").is_file()
    comat = results["rows"]["comat"]
    assert comat["algorithm"] == "draft" and comat["reward"] == "weighted" and comat["iterations"] == 1
    assert isinstance(comat["train_reward"], float)
    # the metrics rollouts were scored by a reward actor on every CoMat term: the sampler shipped the attention maps
    # and latents, the learner its discriminator weights
    import mlflow

    metrics = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(comat["run_id"]).data.metrics
    for key in ("rollout_reward/soft_detector", "rollout_reward/grounded_attention/token_loss",
                "rollout_reward/grounded_attention/pixel_loss", "rollout_reward/fidelity/adv_g_loss"):
        assert key in metrics, key
    assert "rollout_reward/skipped_terms" not in metrics
    # every trained row evaluates on the same prompts and noise as the base row: its "before" is the base model
    assert comat["oracle_before_overall"]["all_correct"] == results["rows"]["base"]["overall"]["all_correct"]
    # the paired change with its interval, samples-to-target and the reward-hacking verdict, per trained row
    assert set(comat["change"]["families"]) == set(FAMILIES) and len(comat["change"]["overall"]["ci"]) == 2
    assert set(comat["samples_to_target"]) == {"+0.05", "+0.10"} and isinstance(comat["reward_hacking"], list)
    assert len(results["rows"]["base"]["families"]["single"]["all_correct_ci"]) == 2
    md = (out / "compare.md").read_text()
    assert "change vs before training [95%]" in md and "samples to +0.05" in md
    assert "| CoMat |" in md and "| base (no training) |" in md and js.with_suffix(".md").is_file()
    assert (out / "grids" / "comat" / "grid_binding.png").is_file() and (out / "montage_binding.png").is_file()
    # unchanged rows are reused, not retrained; rows merged out of order (e.g. from runs made in parallel) come back
    # in the methods' order
    stored = json.loads(js.read_text())
    stored["rows"] = dict(reversed(list(stored["rows"].items())))
    js.write_text(json.dumps(stored))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jobs.compare"):
        result = ralign_cli_inprocess(*args)
    assert result.exit_code == 0 and "reusing comat" in caplog.text, (result.output[-3000:], result.exception)
    rows = json.loads(js.read_text())["rows"]
    assert rows["comat"]["run_id"] == comat["run_id"] and list(rows) == ["base", "comat", "flow_base"]
    assert json.loads(js.read_text())["montages"]["binding"] == list(rows)  # every row shown, reused or not
    # each row records the weights it was measured with: the pipeline and what its reward reads
    assert set(rows["base"]["weights"]) == {"base"} and set(rows["flow_base"]["weights"]) == {"flow"}
    assert {"base", "detector", "segmenter"} <= set(rows["comat"]["weights"])


def test_a_setting_added_at_its_old_behaviour_keeps_stored_rows_valid():
    """Adding a setting must not make every committed row look stale: at the default that reproduces the older
    behaviour it stays out of the digest; set otherwise it is part of it."""
    from jobs.compare import _digest, method_config

    committed = json.loads((Path(__file__).parents[1] / "benchmarks/results/compare.json").read_text())
    cfg = method_config("comat", 100, None, [])
    assert not cfg.model.policy.segment_keep_eos
    assert _digest(cfg, 100) == committed["rows"]["comat"]["config_digest"]
    kept = method_config("comat", 100, None, ["model.policy.segment_keep_eos=true"])
    assert _digest(kept, 100) != _digest(cfg, 100)
    # an algorithm's setting likewise (GRPO's shared initial noise came after the quickstart's row)
    cfg = method_config("grpo", 100, None, [])
    assert _digest(cfg, 100) == committed["rows"]["grpo"]["config_digest"]
    assert _digest(method_config("grpo", 100, None, ["algorithm.grpo.shared_initial_noise=true"]), 100) != _digest(cfg, 100)


def test_a_changed_pre_stage_makes_the_stored_row_stale(tmp_path, monkeypatch):
    """LongAlign's row is made by stage 1 (longalign_sft.yaml) and stage 2: a change to either is a different row. The
    digest does not depend on where the checkout is (the config makes the stage-1 path absolute)."""
    from jobs.compare import _digest, method_config, pre_stage_config

    committed = json.loads((Path(__file__).parents[1] / "benchmarks/results/compare.json").read_text())
    monkeypatch.chdir(tmp_path)  # another checkout's root
    cfg = method_config("longalign", 100, None, [])
    stage1 = pre_stage_config("longalign", cfg, None)
    assert cfg.model.init_checkpoint == str(tmp_path.resolve() / "runs" / "longalign_sft")
    assert _digest(cfg, 100, stage1) == committed["rows"]["longalign"]["config_digest"]
    assert _digest(cfg, 100, stage1.model_copy(update={"steps": stage1.steps + 1})) != _digest(cfg, 100, stage1)
    assert pre_stage_config("comat", method_config("comat", 100, None, []), None) is None


def test_a_row_measured_with_other_weights_is_not_passed_off_as_current(tmp_path):
    """A config digest cannot see retrained weights behind the same path: rows record their models' fingerprints,
    a changed one makes the row stale (run again, and marked in the table until then)."""
    import shutil

    from jobs.compare import changed_weights, markdown_table, method_config, stale_rows, weights_read
    from ralign.models import TOY_MODELS_DIR
    from ralign.models.weights import weights_fingerprint
    from ralign.rewards.registry import model_dirs

    weights = weights_read("draft", method_config("draft", 100, None, []))
    assert set(weights) == {"base", "preference"}
    assert set(weights_read("longalign", method_config("longalign", 100, None, []))) == {"base", "preference", "detector"}
    assert changed_weights({"weights": weights}, weights) == []
    assert changed_weights({"weights": {**weights, "preference": "0" * 12}}, weights) == ["preference"]
    assert changed_weights({}, weights) == []  # a row from before fingerprints: unknown, not stale
    tiny = method_config("draft", 100, None, ["model.pipeline=tiny-random"])
    assert set(weights_read("draft", tiny)) == {"preference"}  # a pipeline built in memory has no weights on disk
    # the reward says what it reads, through composites and wrappers, with its path options
    assert model_dirs("fault_injection", {"inner": {"name": "detector"}}) == [TOY_MODELS_DIR / "detector"]
    assert model_dirs("grounded_attention", {"segmenter": {"backend": "toy_grounded"}}) == [TOY_MODELS_DIR / "detector", TOY_MODELS_DIR / "segmenter"]
    copy = shutil.copytree(TOY_MODELS_DIR / "preference", tmp_path / "preference")
    assert model_dirs("weighted", {"terms": [{"name": "preference", "path": str(copy)}, {"name": "colorfulness"}]}) == [copy.resolve()]
    before = weights_fingerprint(copy)
    assert before == weights["preference"]
    (copy / "open_clip_config.json").write_text((copy / "open_clip_config.json").read_text() + "\n")
    assert weights_fingerprint(copy) != before
    committed = json.loads((Path(__file__).parents[1] / "benchmarks/results/compare.json").read_text())
    draft_row = committed["rows"]["draft"]
    assert stale_rows({**committed, "rows": {"draft": {**draft_row, "weights": weights}}}) == {}
    stale = stale_rows({**committed, "rows": {"draft": {**draft_row, "config_digest": "0" * 12,
                                                        "weights": {**weights, "preference": "0" * 12}}}})
    assert stale == {"draft": ["an earlier config", "earlier weights of preference"]}
    md = markdown_table({**committed, "rows": {"draft": draft_row}}, stale)
    assert "| DRaFT-2 + preference (measured with an earlier config and earlier weights of preference) |" in md


def test_a_reused_row_keeps_its_montage_row_and_a_run_again_row_shows_its_new_grid(tmp_path):
    from PIL import Image

    from jobs.compare import write_montages
    from ralign.world.scene import IMAGE_SIZE

    row_height = IMAGE_SIZE * 2 + 6
    grid = tmp_path / "grids" / "draft"
    grid.mkdir(parents=True)
    Image.new("RGB", (300, 2 * row_height), (255, 0, 0)).save(grid / "grid_single.png")
    earlier = Image.new("RGB", (450, 2 * row_height), (0, 0, 255))  # rows: refl (blue), draft (green)
    earlier.paste((0, 255, 0), (0, row_height, 450, 2 * row_height))
    earlier.save(tmp_path / "montage_single.png")

    shown = write_montages(tmp_path, ["refl", "draft", "comat"], {"single": ["refl", "draft"]})
    assert shown == {"single": ["refl", "draft"]}  # comat has neither a grid nor an earlier row
    montage = Image.open(tmp_path / "montage_single.png").convert("RGB")
    assert montage.height == 2 * row_height
    assert montage.getpixel((200, row_height // 2)) == (0, 0, 255)  # refl: the earlier montage's row
    assert montage.getpixel((200, row_height + row_height // 2)) == (255, 0, 0)  # draft: its new grid, not the old row
    # a montage whose height does not match the rows it is said to show is not cut up
    shown = write_montages(tmp_path, ["refl", "draft"], {"single": ["refl", "draft", "comat"]})
    assert shown == {"single": ["draft"]}
