"""The one place an algorithm is looked up by name.

Each entry names the algorithm, the config section its settings live in (`algorithm.<section>`) and where its class
is; modules are imported only when asked for, so validating a config does not import every algorithm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ralign.algorithms.base import Algorithm
    from ralign.config import StrictModel

_ALGORITHMS: dict[str, "str | type[Algorithm]"] = {
    "dpok": "ralign.algorithms.dpok:DPOK",
    "grpo": "ralign.algorithms.grpo:GRPO",
    "nft": "ralign.algorithms.nft:NFT",
    "rsft": "ralign.algorithms.rsft:RSFT",
    "refl": "ralign.algorithms.refl:ReFL",
    "draft": "ralign.algorithms.draft:DRaFT",
    "alignprop": "ralign.algorithms.alignprop:AlignProp",
    "interval": "ralign.algorithms.interval:IntervalBackprop",
}
# Settings sections, by key: several algorithms may share one (DRaFT, AlignProp and interval: `backprop`).
_SECTIONS: dict[str, str] = {
    "dpok": "dpok",
    "grpo": "grpo",
    "nft": "nft",
    "rsft": "rsft",
    "refl": "refl",
    "draft": "backprop",
    "alignprop": "backprop",
    "interval": "backprop",
}


def register(cls: "type[Algorithm]") -> "type[Algorithm]":
    """Add an algorithm (usable as a class decorator); its `name` selects it, its `section` holds its settings."""
    _ALGORITHMS[cls.name] = cls
    _SECTIONS[cls.name] = cls.section
    return cls


def algorithm_names() -> list[str]:
    return sorted(_ALGORITHMS)


def algorithm_class(name: str) -> "type[Algorithm]":
    if name not in _ALGORITHMS:
        raise ValueError(f"algorithm.name={name!r} is not a known algorithm; expected one of {algorithm_names()}")
    entry = _ALGORITHMS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = _ALGORITHMS[name] = getattr(importlib.import_module(module), attr)
    return entry


def section_keys() -> set[str]:
    return set(_SECTIONS.values())


def section_class(key: str) -> "type[StrictModel]":
    """The settings model of section `algorithm.<key>` (from the first algorithm that keeps its settings there)."""
    for name, section in _SECTIONS.items():
        if section == key:
            return algorithm_class(name).Settings
    raise KeyError(key)


def build_algorithm(cfg) -> "Algorithm":
    """The configured algorithm for a training config."""
    return algorithm_class(cfg.algorithm.name)(cfg)
