"""LongAlign's decomposed preference reward: the preference score split into a text-relevant and a text-irrelevant
part, with the text-irrelevant part down-weighted so that fine-tuning cannot win by making every image "nicer".

With normalised image embedding f and text embedding t (for a multi-sentence prompt, the mean of its normalised
sentence embeddings, since the preference model's own context is short), the text-irrelevant direction v is the
normalised mean of t over the *global* batch (gathered from every learner worker). Then

    t' = t - (1 - w) (t.v) v,      score = t'.f = relevant + w * irrelevant,
    relevant = (t - (t.v) v).f,    irrelevant = (t.v)(v.f)

w = 1 gives back the plain preference score; LongAlign uses w = 0.3. Both parts are reported as components.

Defaults follow LongAlign's code (`dense_score` in its loss.py): the sentence mean is *not* renormalised (a prompt
whose sentences disagree gets a shorter t, so a smaller score), and v averages the per-process means (each learner's
batch weighs the same, as `accelerator.gather(mean).mean()` does). `renormalise_segments=True` and
`direction="rows"` (every row of the global batch weighs the same) are the alternatives; they differ only for
multi-sentence prompts and uneven per-worker batches.
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


DIRECTIONS = ("process_means", "rows")


def global_mean(x: torch.Tensor, direction: str = "rows") -> torch.Tensor:
    """Mean over the batch of every process in the default torch.distributed group (this batch alone if there is
    none): of every row (`rows`), or of each process's own mean (`process_means`). Other ranks' rows arrive without
    gradient, which is all `v` needs: it is built from text embeddings."""
    dist = active_dist()
    if dist is None or dist.get_world_size() == 1:
        return x.mean(dim=0)
    if direction == "process_means":
        means = [torch.zeros(x.shape[1:], dtype=x.dtype) for _ in range(dist.get_world_size())]
        dist.all_gather(means, x.detach().mean(dim=0).cpu())
        return torch.stack(means).mean(dim=0).to(x.device, x.dtype)
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

    def __init__(self, path: str | Path = TOY_DIR / "preference", w: float = 0.3, renormalise_segments: bool = False,
                 direction: str = "process_means", device: str = "cpu"):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"decomposed_preference: w must be in [0, 1], got {w}")
        if direction not in DIRECTIONS:
            raise ValueError(f"decomposed_preference: direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        super().__init__(path, device)
        self.w, self.renormalise_segments, self.direction = w, bool(renormalise_segments), direction

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """One embedding per prompt: a multi-sentence prompt's is the mean of its sentences' normalised embeddings
        (renormalised only with `renormalise_segments`)."""
        segments = [split_segments(p) for p in prompts]
        flat = encode_texts(self.model, self.tokenizer, [s for segs in segments for s in segs])
        out, start = [], 0
        for segs in segments:
            mean = flat[start : start + len(segs)].mean(dim=0)
            out.append(F.normalize(mean, dim=-1) if self.renormalise_segments else mean)
            start += len(segs)
        return torch.stack(out)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        f = encode_images(self.model, images)
        t = self.text_embeddings(prompts)
        v = F.normalize(global_mean(t, self.direction), dim=-1)
        along = t @ v  # (B,) t.v
        relevant = ((t - along[:, None] * v) * f).sum(-1)
        irrelevant = along * (f @ v)
        score = relevant + self.w * irrelevant
        return RewardOutput(score, {"text_relevant": relevant, "text_irrelevant": irrelevant, "preference": relevant + irrelevant})
