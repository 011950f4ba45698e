"""LongAlign's decomposed preference reward: the preference score split into a text-relevant and a text-irrelevant
part, with the text-irrelevant part down-weighted so that fine-tuning cannot win by making every image "nicer".

With normalised image embedding f and text embedding t (for a multi-sentence prompt, the normalised mean of its
normalised sentence embeddings, since the preference model's own context is short), the text-irrelevant direction
v is the normalised mean of t over the *global* batch (gathered from every learner worker). Then

    t' = t - (1 - w) (t.v) v,      score = t'.f = relevant + w * irrelevant,
    relevant = (t - (t.v) v).f,    irrelevant = (t.v)(v.f)

w = 1 gives back the plain preference score; LongAlign uses w = 0.3. Both parts are reported as components.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ralign.training.distributed import active_dist
from ralign.models.reward_clip import encode_images, encode_texts
from ralign.rewards.base import RewardOutput
from ralign.rewards.clip_score import TOY_DIR, PreferenceReward
from ralign.diffusion.text_encoding import split_segments


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of every process in the default torch.distributed group (this batch alone if there is
    none). Other ranks' rows arrive without gradient, which is all `v` needs: it is built from text embeddings."""
    dist = active_dist()
    if dist is None or dist.get_world_size() == 1:
        return x.mean(dim=0)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x.detach().cpu()
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    rows = torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])
    return rows.mean(dim=0).to(x.device, x.dtype)


class DecomposedPreferenceReward(PreferenceReward):
    name = "decomposed_preference"

    def __init__(self, path: str | Path = TOY_DIR / "preference", w: float = 0.3, device: str = "cpu"):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"decomposed_preference: w must be in [0, 1], got {w}")
        super().__init__(path, device)
        self.w = w

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """One normalised embedding per prompt; a multi-sentence prompt is the mean of its sentences' embeddings."""
        segments = [split_segments(p) for p in prompts]
        flat = encode_texts(self.model, self.tokenizer, [s for segs in segments for s in segs])
        out, start = [], 0
        for segs in segments:
            out.append(F.normalize(flat[start : start + len(segs)].mean(dim=0), dim=-1))
            start += len(segs)
        return torch.stack(out)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        f = encode_images(self.model, images)
        t = self.text_embeddings(prompts)
        v = F.normalize(global_mean(t), dim=-1)
        along = t @ v  # (B,) t.v
        relevant = ((t - along[:, None] * v) * f).sum(-1)
        irrelevant = along * (f @ v)
        score = relevant + self.w * irrelevant
        return RewardOutput(score, {"text_relevant": relevant, "text_irrelevant": irrelevant, "preference": relevant + irrelevant})
