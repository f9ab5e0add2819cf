"""Token merging (ToMe) for the open_clip image tower, for training and inference.

Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT But Faster", ICLR 2023. This follows
the authors' code (github.com/facebookresearch/ToMe): `tome/merge.py` (`bipartite_soft_matching`,
`merge_wavg`), `tome/patch/timm.py` (`ToMeBlock`, `ToMeAttention`), `tome/patch/clip.py` and `tome/utils.py`
(`parse_r`). In every block, between attention and MLP, the r most similar token pairs are merged:

- metric: the block's attention keys averaged over heads, cosine-normalised (keys summarise what a token
  "contains", so tokens with similar keys are redundant);
- bipartite soft matching: tokens alternate between set A (even positions) and B (odd positions); every A
  token finds its most similar B token, and the r A tokens with the best match are averaged into it. The
  class token (index 0, in A) is never merged and, because unmerged A tokens keep their order and come first,
  stays at index 0, so open_clip's 'tok' pooling keeps working. r is capped at half the non-class tokens;
- size tracking: each token remembers how many patches it stands for; merges are size-weighted means, and
  proportional attention adds log(size) to the attention logits so a merged token weighs as its patches did.

Differences from the authors' patch, kept deliberately small: the per-forward state (sizes) is passed
from block to block instead of living in a shared dict, so `set_grad_checkpointing` (which re-runs blocks
in backward) stays correct; a block with nothing to merge and no size bias to add runs open_clip's own
forward, which makes r=0 bit-identical to the unpatched tower. Nothing is random; on CUDA the merge's
`scatter_reduce` sums with atomics unless `torch.use_deterministic_algorithms(True)` is set.

No parameters are added or renamed: the patched model saves and loads the same state dict. Only
`Transformer.forward` of `model.visual.transformer` is replaced; `forward_intermediates` (dense feature
maps) still runs unmerged. With `output_tokens=True` the returned patch tokens are the merged ones; 'avg'
pooling averages merged tokens unweighted, as the authors' timm patch does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch.utils.checkpoint import checkpoint

from xmodal.models.attention import attend

__all__ = [
    "apply_tome",
    "remove_tome",
    "bipartite_soft_matching",
    "merge_wavg",
    "tome_block",
    "tome_token_counts",
    "ToMeTransformer",
]

Merge = Callable[..., torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> Merge:
    """Plan the merge of r tokens from `metric` [batch, tokens, channels]; return `merge(x, mode)`.

    The plan (which token goes where) is computed without gradient: it is a discrete choice, as in the
    authors' code; gradients flow through the merged values. `merge` maps [batch, tokens, c] to
    [batch, tokens - r, c]: unmerged A tokens in their original order, then all B tokens.
    """
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)  # at most half the tokens can find a partner
    if r <= 0:
        return lambda x, mode="mean": x

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf  # the class token matches nothing, so it is never chosen
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :].sort(dim=-2).values  # sorted: the class token stays first
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `x` as size-weighted means; return (merged x, summed sizes [batch, tokens, 1])."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, size: torch.Tensor | None):
    """Self-attention with `attn`'s weights on batch-first x; return (output, keys averaged over heads).

    nn.MultiheadAttention hides its keys and takes no additive bias per key, so the projection is redone
    here (same weights, same 1/sqrt(head_dim) scaling) with log(size) added to the logits when given.
    """
    n, t, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (y.view(n, t, h, d // h).transpose(1, 2) for y in (q, k, v))
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    dropout = attn.dropout if attn.training else 0.0
    out = attend(q, k, v, bias, dropout)  # written out in training: faster on CPUs
    out = attn.out_proj(out.transpose(1, 2).reshape(n, t, d))
    return out, k.mean(1)


def tome_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    prop_attn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One open_clip block with ToMe (the authors' `ToMeBlock.forward`) on batch-first x -> (x, size)."""
    y, metric = _attention(block.attn, block.ln_1(x), size if prop_attn else None)
    x = x + block.ls_1(y)
    if r > 0:
        x, size = merge_wavg(bipartite_soft_matching(metric, r, class_token=True), x, size)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, size


def _parse_r(r: int | list[int], layers: int) -> list[int]:
    """A constant r, or one r per block (padded with zeros), as the authors' `parse_r`."""
    rs = [r] * layers if isinstance(r, int) else list(r)
    if len(rs) > layers or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in rs):
        raise ValueError(
            f"ToMe r must be a non-negative int or a list of at most {layers} of them, got {r!r}"
        )
    return rs + [0] * (layers - len(rs))


def tome_token_counts(num_tokens: int, r: int | list[int], layers: int) -> list[int]:
    """Tokens entering each block and leaving the last (length layers + 1), class token included.

    `num_tokens` is what reaches the transformer: patches + 1, or fewer while patch dropout is training.
    """
    counts = [num_tokens]
    for ri in _parse_r(r, layers):
        counts.append(counts[-1] - min(ri, (counts[-1] - 1) // 2))
    return counts


class ToMeTransformer(Transformer):
    """open_clip's `Transformer` whose forward merges tokens; attributes `tome_r`, `tome_prop_attn`."""

    tome_r: list[int]
    tome_prop_attn: bool

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x is [batch, tokens, width] on entry and exit, as for the parent: VisionTransformer passes it so
        if not any(self.tome_r):
            return super().forward(x, attn_mask)  # r=0: open_clip's own code path, bit for bit
        if attn_mask is not None:
            raise ValueError("ToMe merges tokens and cannot follow an attention mask")
        size = None
        for blk, r in zip(self.resblocks, self.tome_r, strict=True):
            ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            if r == 0 and (size is None or not self.tome_prop_attn):  # nothing ToMe-specific: stock block
                y = x if self.batch_first else x.transpose(0, 1)
                y = checkpoint(blk, y, use_reentrant=False) if ckpt else blk(y)
                x = y if self.batch_first else y.transpose(0, 1)
            elif ckpt:
                x, size = checkpoint(tome_block, blk, x, size, r, self.tome_prop_attn, use_reentrant=False)
            else:
                x, size = tome_block(blk, x, size, r, self.tome_prop_attn)
        return x


def _visual_transformer(model: torch.nn.Module) -> Transformer:
    visual = getattr(model, "visual", model)
    transformer = getattr(visual, "transformer", None)
    if not isinstance(transformer, Transformer):
        raise TypeError(f"ToMe needs an open_clip VisionTransformer image tower, not {type(visual).__name__}")
    return transformer


def apply_tome(model: torch.nn.Module, r: int | list[int], prop_attn: bool = True) -> None:
    """Merge r tokens per image-tower block (an int, or a list with one r per block) of `model` in place.

    `model` is an open_clip CLIP/CoCa (its `.visual` is patched) or the VisionTransformer itself. Calling it
    again changes r; r=0 is the unpatched tower exactly. The authors enable proportional attention for
    off-the-shelf models and note that models trained with ToMe may do without it (`prop_attn=False`).
    """
    transformer = _visual_transformer(model)
    rs = _parse_r(r, len(transformer.resblocks))
    for blk in transformer.resblocks:
        attn = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            raise TypeError(
                f"ToMe supports open_clip's default ResidualAttentionBlock, not {type(blk).__name__}"
            )
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError("ToMe supports plain self-attention blocks only")
    if type(transformer) is not ToMeTransformer:
        if type(transformer) is not Transformer:
            raise TypeError(
                f"ToMe patches open_clip's Transformer, not a {type(transformer).__name__} subclass"
            )
        transformer.__class__ = ToMeTransformer
    transformer.tome_r = rs
    transformer.tome_prop_attn = bool(prop_attn)


def remove_tome(model: torch.nn.Module) -> None:
    """Undo `apply_tome` (a no-op on an unpatched model)."""
    transformer = _visual_transformer(model)
    if type(transformer) is ToMeTransformer:
        transformer.__class__ = Transformer
        del transformer.tome_r, transformer.tome_prop_attn
