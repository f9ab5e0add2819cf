"""Token-wise late interaction: FILIP (registered as `filip`).

Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training". With x_{i,k} image i's
(L2-normalised) patch tokens, k = 1…n₁, and y_{j,r} text j's real tokens, r = 1…n₂(j):

    s^I_{ij} = 1/n₁    Σ_k max_r ⟨x_{i,k}, y_{j,r}⟩      (each image token finds its best word)
    s^T_{ij} = 1/n₂(j) Σ_r max_k ⟨x_{i,k}, y_{j,r}⟩      (each word finds its best patch)

    L = ½ [ −1/b Σ_i log softmax_j(t·s^I_{ij})_{i}  −  1/b Σ_j log softmax_i(t·s^T_{ij})_{j} ]

image→text InfoNCE on s^I, text→image on s^T, t the model's logit scale. Padding text positions take part
in neither the max nor the mean (they are zeroed first, so even non-finite padding cannot leak in).

Memory: the b×B×n₁×n₂ similarity is never held whole. It is computed in blocks of captions of at most
`chunk_mb` MiB; what autograd keeps per block is the arg-max indices (b×B×(n₁+n₂) int64), not the block.

Token selection (FILIP §3.1.2, `token_fraction`, the paper uses 0.25): each image keeps the
⌈fraction·n₁⌉ of its tokens with the highest token-wise maximum similarity to the batch's texts, i.e.
score(x_{i,k}) = max_{j,r} ⟨x_{i,k}, y_{j,r}⟩ over every real token of every text, chosen without
gradient, *before* the image tokens are gathered, so the all-gather and both similarities shrink by that
fraction. The paper scores "among all texts in the same local worker"; here the texts are those of the
global batch (they are gathered anyway), which is the same in one process and makes the selection — and
so the loss — independent of how the batch is sharded. `token_fraction=1` selects nothing.

Data parallelism: each rank gathers the token features of all ranks *with* gradients
(`registry.gather_with_grad`; the text mask without), first padding its captions to the longest length of
any rank (the trimmed text tower gives each rank its own length). A rank scores its own images against all
texts (i→t rows) and its own texts against all images (t→i rows) and returns the mean over its rows, so
the ranks' terms average to the global batch's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xmodal.objectives.registry import Features, Objective, gather, gather_with_grad, register


def _block(per_caption: int, chunk_mb: float) -> int:
    """How many captions' `per_caption` float32 similarities fit in `chunk_mb` MiB (at least one)."""
    return max(1, int(chunk_mb * 2**20 // (4 * max(1, per_caption))))


def _similarity_blocks(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, chunk_mb: float):
    """Yield (j, P×K×c×L similarities of x against captions j…j+c) with padding positions far below
    any real similarity, so that they never win a max over words. `y` must be zero on padding.

    The padding bias rides in the matmul as an extra coordinate (x: 1, y: 0 or the bias), which costs
    nothing, where masking the block afterwards would cost a pass over it."""
    p, k, d = x.shape
    q, length, _ = y.shape
    bias = -(2.0 * float(x.detach().norm(dim=-1).max()) * float(y.detach().norm(dim=-1).max()) + 1.0)
    xa = torch.cat([x.reshape(p * k, d), x.new_ones(p * k, 1)], dim=1)
    ya = torch.cat([y, (~mask).to(y.dtype)[..., None] * bias], dim=2)
    step = _block(p * k * length, chunk_mb)
    for j in range(0, q, step):
        yb = ya[j : j + step]
        yield j, (xa @ yb.reshape(-1, d + 1).T).view(p, k, yb.shape[0], length)


class _LateInteraction(torch.autograd.Function):
    """(s^I, s^T) in blocks; keeps the arg-max indices, not the blocks, and rebuilds each block's
    gradient (one fill, two scatters, two matmuls) in backward."""

    @staticmethod
    def forward(ctx, x, y, mask, want_image, want_text, chunk_mb):
        p, k, d = x.shape
        q, length, _ = y.shape
        counts = mask.sum(dim=1).clamp(min=1).to(y.dtype)
        s_img = x.new_zeros(p, q) if want_image else x.new_zeros(0)
        s_txt = x.new_zeros(p, q) if want_text else x.new_zeros(0)
        idx_img = torch.empty(p, k, q, dtype=torch.long, device=x.device) if want_image else None
        idx_txt = torch.empty(p, q, length, dtype=torch.long, device=x.device) if want_text else None
        for j, sim in _similarity_blocks(x, y, mask, chunk_mb):
            c = sim.shape[2]
            if want_image:  # each image token's best real word, averaged over the image's tokens
                best, idx_img[:, :, j : j + c] = sim.max(dim=3)
                s_img[:, j : j + c] = best.mean(dim=1)
            if want_text:  # each real word's best image token, averaged over the caption's real words
                best, idx_txt[:, j : j + c] = sim.max(dim=1)
                s_txt[:, j : j + c] = best.where(mask[j : j + c], 0.0).sum(dim=2) / counts[j : j + c]
        ctx.save_for_backward(x, y, mask, counts, idx_img, idx_txt)
        ctx.chunk_mb = chunk_mb
        if not want_image:
            ctx.mark_non_differentiable(s_img)
        if not want_text:
            ctx.mark_non_differentiable(s_txt)
        return s_img, s_txt

    @staticmethod
    def backward(ctx, g_img, g_txt):
        x, y, mask, counts, idx_img, idx_txt = ctx.saved_tensors
        p, k, d = x.shape
        q, length, _ = y.shape
        x2 = x.reshape(p * k, d)
        gx, gy = torch.zeros_like(x2), torch.zeros_like(y)
        w_txt = mask.to(y.dtype) / counts[:, None] if idx_txt is not None else None
        step = _block(p * k * length, ctx.chunk_mb)
        for j in range(0, q, step):
            c = min(step, q - j)
            grad = x.new_zeros(p, k, c, length)
            if idx_img is not None:
                src = (g_img[:, j : j + c] / k)[:, None, :, None].expand(p, k, c, 1)
                grad.scatter_(3, idx_img[:, :, j : j + c, None], src)
            if idx_txt is not None:
                src = (g_txt[:, j : j + c, None] * w_txt[j : j + c])[:, None]
                grad.scatter_add_(1, idx_txt[:, None, j : j + c], src)
            grad = grad.view(p * k, c * length)
            gx += grad @ y[j : j + c].reshape(c * length, d)
            gy[j : j + c] = (grad.T @ x2).view(c, length, d)
        return gx.view(p, k, d), gy, None, None, None, None


def late_scores(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    want_image: bool = True,
    want_text: bool = True,
    chunk_mb: float = 32.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(s^I, s^T), each P×Q, for P images' tokens P×K×D against Q texts' tokens Q×L×D (mask Q×L):
    s^I_ij = mean_k max_{real r} ⟨x_ik, y_jr⟩, s^T_ij = mean_{real r} max_k ⟨x_ik, y_jr⟩.
    Either can be skipped (None). Padding positions must already be zero (see `filip_loss`)."""
    s_img, s_txt = _LateInteraction.apply(
        image_tokens, text_tokens, text_mask, want_image, want_text, chunk_mb
    )
    return (s_img if want_image else None, s_txt if want_text else None)


def _zero_padding(text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    return text_tokens.masked_fill(~text_mask[..., None], 0.0)


def keep_count(n_tokens: int, fraction: float) -> int:
    """⌈fraction·n⌉ tokens, at least one."""
    return max(1, min(n_tokens, math.ceil(fraction * n_tokens - 1e-9)))


@torch.no_grad()
def _selection_scores(
    image_tokens: torch.Tensor, all_text_tokens: torch.Tensor, all_text_mask: torch.Tensor, chunk_mb: float
) -> torch.Tensor:
    """b×K: each image token's maximum similarity to any real token of any text."""
    score = torch.full(
        image_tokens.shape[:2], -torch.inf, dtype=image_tokens.dtype, device=image_tokens.device
    )
    for _, sim in _similarity_blocks(image_tokens, all_text_tokens, all_text_mask, chunk_mb):
        score = torch.maximum(score, sim.flatten(2).max(dim=2).values)
    return score


def select_image_tokens(
    image_tokens: torch.Tensor,
    all_text_tokens: torch.Tensor,
    all_text_mask: torch.Tensor,
    keep: int,
    chunk_mb: float = 32.0,
) -> torch.Tensor:
    """b×keep×D: each image's `keep` tokens with the highest maximum similarity to the texts' real tokens
    (kept in their original order; gradients flow into the kept tokens)."""
    b, k, d = image_tokens.shape
    if keep >= k:
        return image_tokens
    texts = _zero_padding(all_text_tokens.detach(), all_text_mask)
    score = _selection_scores(image_tokens.detach(), texts, all_text_mask, chunk_mb)
    idx = score.topk(keep, dim=1).indices.sort(dim=1).values
    return image_tokens.gather(1, idx[..., None].expand(b, keep, d))


def filip_loss(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_tokens: torch.Tensor | None = None,
    all_text_tokens: torch.Tensor | None = None,
    all_text_mask: torch.Tensor | None = None,
    offset: int = 0,
    chunk_mb: float = 32.0,
) -> torch.Tensor:
    """FILIP's symmetric InfoNCE on the late-interaction scores: local rows (b) against all columns (B);
    row i's positive is column offset+i. With no `all_*` given, the single-batch loss."""
    txt = _zero_padding(text_tokens, text_mask)
    if all_image_tokens is None:  # one batch: one pass gives both directions
        s_img, s_txt = late_scores(image_tokens, txt, text_mask, chunk_mb=chunk_mb)
    else:
        assert all_text_tokens is not None and all_text_mask is not None
        all_txt = _zero_padding(all_text_tokens, all_text_mask)
        s_img, _ = late_scores(image_tokens, all_txt, all_text_mask, want_text=False, chunk_mb=chunk_mb)
        _, s_txt = late_scores(all_image_tokens, txt, text_mask, want_image=False, chunk_mb=chunk_mb)
    labels = torch.arange(image_tokens.shape[0], device=image_tokens.device) + offset
    logits_i2t = logit_scale * s_img  # b local images × B texts
    logits_t2i = logit_scale * s_txt.T  # b local texts × B images
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def _pad_to_common_length(text_tokens: torch.Tensor, text_mask: torch.Tensor):
    """Under data parallelism: pad the captions to the longest length of any rank (mask False there)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return text_tokens, text_mask
    n = torch.tensor([text_tokens.shape[1]], device=text_tokens.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    extra = int(n.item()) - text_tokens.shape[1]
    if extra:
        text_tokens = F.pad(text_tokens, (0, 0, 0, extra))
        text_mask = F.pad(text_mask, (0, extra), value=False)
    return text_tokens, text_mask


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class FilipParams:
    token_fraction: float = 1.0  # keep this fraction of each image's tokens (the paper: 0.25)
    chunk_mb: float = 32.0  # largest similarity block computed at once, MiB

    def __post_init__(self) -> None:
        if not 0.0 < self.token_fraction <= 1.0:
            raise ValueError(f"token_fraction={self.token_fraction} is not in (0, 1]")
        if not self.chunk_mb > 0:
            raise ValueError(f"chunk_mb={self.chunk_mb} is not positive")


@register
class Filip(Objective):
    name = "filip"
    description = (
        "token-wise late interaction: InfoNCE on the mean over tokens of the best-matching token's "
        "similarity (image→text and text→image)"
    )
    paper = "Yao et al. 2021, FILIP: Fine-grained Interactive Language-Image Pre-Training"
    Params = FilipParams
    needs = frozenset({"pooled", "tokens"})
    supports_accumulation = False  # needs the token features, not GradCache's cached pooled ones

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        if f.image_tokens is None or f.text_tokens is None or f.text_mask is None:
            raise ValueError("filip needs image_tokens, text_tokens and text_mask in the Features")
        p = self.params
        txt, mask = _pad_to_common_length(_at_least_fp32(f.text_tokens), f.text_mask.bool())
        all_txt = gather_with_grad(txt)
        all_mask = gather(mask.to(torch.uint8)).bool()
        img = _at_least_fp32(f.image_tokens)
        img = select_image_tokens(
            img, all_txt, all_mask, keep_count(img.shape[1], p.token_fraction), p.chunk_mb
        )
        all_img = gather_with_grad(img)
        if all_img is img:  # one process
            loss = filip_loss(img, txt, mask, f.logit_scale, chunk_mb=p.chunk_mb)
        else:
            loss = filip_loss(img, txt, mask, f.logit_scale, all_img, all_txt, all_mask, f.offset, p.chunk_mb)
        return {"filip": loss}
