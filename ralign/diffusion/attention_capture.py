"""Cross-attention maps of a diffusers UNet, captured with attention processors, for CoMat's attribute concentration.

diffusers' default processor (scaled-dot-product attention) never materialises the attention probabilities, so the
chosen cross-attention layers get `RecordingAttnProcessor` for the duration of a capture: the same computation as
diffusers' `AttnProcessor`, with the softmax probabilities kept (with their graph, so losses on them train the
UNet). Only the mid and up blocks are recorded, as CoMat does; maps are grouped by resolution.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # a type only: the rollout actors import this module, and diffusers costs them seconds
    from diffusers.models.attention_processor import Attention


class RecordingAttnProcessor:
    """diffusers' `AttnProcessor` for a cross-attention layer, keeping the head-averaged probabilities."""

    def __init__(self, store: "AttentionStore", group: str):
        self.store, self.group = store, group

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, pixels, tokens)
        self.store.record(self.group, probs.view(batch_size, attn.heads, *probs.shape[1:]).mean(dim=1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _group(name: str, unet) -> str | None:
    """'mid' or 'up' + the layer's spatial side, for cross-attention ('attn2') layers of the mid and up blocks."""
    if ".attn2." not in name + "." or not (name.startswith("mid_block") or name.startswith("up_blocks")):
        return None
    side = unet.config.sample_size
    if name.startswith("mid_block"):
        return f"mid_{side // 2 ** (len(unet.config.block_out_channels) - 1)}"
    up_index = int(name.split(".")[1])
    return f"up_{side // 2 ** (len(unet.config.block_out_channels) - 1 - up_index)}"


class AttentionStore:
    """Maps recorded during one or more UNet calls: group ('mid_2', 'up_8', ...) -> list of (rows, pixels, tokens).
    With classifier-free guidance a call has 2B rows (uncond first, as `guided_noise` stacks them); `maps(B)` keeps
    the conditional half."""

    def __init__(self, unet):
        self.unet = unet
        self.groups = {n: g for n in unet.attn_processors if (g := _group(n.removesuffix(".processor"), unet))}
        if not self.groups:
            raise ValueError("the UNet has no cross-attention layers in its mid or up blocks to record")
        self.recorded: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(self, group: str, probs: torch.Tensor) -> None:
        self.recorded[group].append(probs)

    @contextlib.contextmanager
    def capture(self) -> Iterator["AttentionStore"]:
        """Record every UNet call inside the block; the UNet's own processors are restored after it."""
        original = self.unet.attn_processors
        procs = {n: (RecordingAttnProcessor(self, self.groups[n]) if n in self.groups else p) for n, p in original.items()}
        self.unet.set_attn_processor(procs)
        try:
            yield self
        finally:
            self.unet.set_attn_processor(original)

    def maps(self, batch: int) -> dict[str, list[torch.Tensor]]:
        """group -> list of (batch, side, side, tokens), the conditional rows of each recorded call."""
        out = {}
        for group, items in self.recorded.items():
            side = int(group.split("_")[1])
            out[group] = [m[-batch:].reshape(batch, side, side, m.shape[-1]) for m in items]
        return out

    def clear(self) -> None:
        self.recorded.clear()

    def step_recorder(self, steps: Sequence[int], batch: int, out: list) -> Callable[[int], contextlib.AbstractContextManager]:
        """A per-step context for `sample_chain(unet_context=...)`: the UNet calls of `steps` are recorded and their
        maps appended to `out` (detached, on the CPU: for shipping, not for gradients)."""
        wanted = set(steps)

        @contextlib.contextmanager
        def around(step: int) -> Iterator[None]:
            if step not in wanted:
                yield
                return
            with self.capture():
                yield
            out.append({g: [m.detach().float().cpu() for m in ms] for g, ms in self.maps(batch).items()})
            self.clear()

        return around


def pack_maps(maps: Sequence[dict[str, list[torch.Tensor]]]) -> dict[str, np.ndarray]:
    """Recorded maps -> one float32 array per group, (steps, layers, B, side, side, tokens), for the object store."""
    if not maps:
        return {}
    return {g: np.stack([np.stack([m.numpy() for m in step[g]]) for step in maps]).astype(np.float32, copy=False) for g in maps[0]}


def unpack_maps(packed: dict[str, np.ndarray], device: str | torch.device = "cpu") -> list[dict[str, list[torch.Tensor]]]:
    """Inverse of `pack_maps` (zero-copy on the CPU)."""
    if not packed:
        return []
    steps = next(iter(packed.values())).shape[0]
    return [{g: [torch.from_numpy(a[s, layer]).to(device) for layer in range(a.shape[1])] for g, a in packed.items()} for s in range(steps)]


def select_samples(packed: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {g: a[:, :, idx] for g, a in packed.items()}
