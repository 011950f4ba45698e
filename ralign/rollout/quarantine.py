"""Quarantined samples as files: one JSON record (prompt, seed, policy version, reason, the reward values that were
not finite) and, when the rollout had one, its image, per sample. The training job writes them to the run's
`quarantine/` artefacts, so a bad reward or a poisoned prompt can be inspected after the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _json_number(value: float | None):
    # JSON has no NaN/inf; the record keeps what the reward returned as text.
    if value is None or math.isfinite(value):
        return value
    return str(value)


def write_quarantine(records: list[dict], directory: str | Path) -> list[Path]:
    """Write each record as `sample_<id>.json` (+ `sample_<id>.png`); returns the files written."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        # Pipeline samples are named by their id; a learner's (its reward scored inside the update) by iteration
        # and seed when it was given no id.
        stem = (f"sample_{int(record['id']):09d}" if record.get("id") is not None
                else f"learner_it{int(record.get('iteration', 0)):06d}_seed{int(record.get('seed', 0))}")
        data = {k: v for k, v in record.items() if k != "image"}
        data["score"] = _json_number(data.get("score"))
        data["components"] = {k: _json_number(v) for k, v in data.get("components", {}).items()}
        image = record.get("image")
        if image is not None:
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(directory / f"{stem}.png")
            data["image_file"] = f"{stem}.png"
            written.append(directory / f"{stem}.png")
        (directory / f"{stem}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
        written.append(directory / f"{stem}.json")
    return written
