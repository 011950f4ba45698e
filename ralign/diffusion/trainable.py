"""What both policies (DiffusionPolicy, FlowPolicy) do the same way with their weights: fingerprint the pretrained
ones and copy trainable tensors in after checking they fit."""

from __future__ import annotations

import torch


def weights_fingerprint(modules) -> str:
    """sha256 (16 hex digits) of the named modules' weights, LoRA adapters excluded."""
    import hashlib

    h = hashlib.sha256()
    for prefix, module in modules:
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if "lora_" in name:
                continue
            h.update(f"{prefix}.{name}".encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def copy_trainable_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], source: str | None,
                         complete: bool) -> None:
    """Copy `state` into the named parameters after checking it fits (names, shapes; finite values when it came from a
    file); `complete` demands every trainable parameter (shared by both policies)."""
    from ralign.models.weights import check_fits

    expected = {k: p.shape for k, p in params.items() if k in state or (complete and p.requires_grad)}
    check_fits(state, expected, source or "weights", complete=complete, finite=source is not None, what="this policy")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
