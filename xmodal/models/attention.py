"""Self-attention as two batched matmuls and a softmax, for training open_clip towers on CPUs.

open_clip's blocks call nn.MultiheadAttention, which goes through scaled_dot_product_attention. On CPUs,
in training, neither of its kernels suits short sequences: the fused flash kernel's backward is slow, and
the math kernel spends as long in `_safe_softmax`'s fully-masked-row checks (`all`, `where`) as in the
softmax, and runs its batched matmuls on strided [N·H, L, d] views. The same formula written out,
softmax(q kᵀ / √d + mask) v with the block's own weights, trains xm-tiny's step about 1.3× faster here
(`benchmarks/step_variants.py`, "SDPA attention" row). No row of open_clip's masks is fully masked (the
causal mask keeps the diagonal), so the plain softmax gives the same numbers.

The weights stay where they are (`attn.in_proj_weight`, `attn.out_proj`): state dicts, checkpoints and
the open_clip export do not change. Without gradients (validation, embedding, frozen teachers) a block runs
open_clip's own path, whose fused kernel is the faster one for inference.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v on [..., t, d] heads: written out when training on a CPU, else
    scaled_dot_product_attention (the faster one there: fused kernels on GPUs, and without a backward)."""
    if not torch.is_grad_enabled() or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    p = scores.softmax(-1)
    return torch.matmul(F.dropout(p, dropout) if dropout else p, v)


def explicit_self_attention(
    block: ResidualAttentionBlock,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None = None,
    v_x: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ResidualAttentionBlock.attention` for batch-first self-attention, written out (see the module)."""
    attn = block.attn
    if k_x is not None or v_x is not None or not torch.is_grad_enabled():
        return ResidualAttentionBlock.attention(block, q_x, k_x, v_x, attn_mask=attn_mask)
    n, t, d = q_x.shape
    h = attn.num_heads
    qkv = (
        F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    )
    q, k, v = qkv.unbind(0)  # each [n, h, t, d/h]
    if attn_mask is not None and attn_mask.dim() == 3:  # [n·h, t, t]
        attn_mask = attn_mask.view(n, h, t, t)
    out = attend(q, k, v, attn_mask, attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(n, t, d))


def use_explicit_attention(model: torch.nn.Module) -> int:
    """Route every batch-first self-attention block of `model` through `explicit_self_attention`;
    return how many blocks now do."""
    n = 0
    for m in model.modules():
        if isinstance(m, ResidualAttentionBlock) and m.attn.batch_first and not hasattr(m, "ln_1_kv"):
            m.attention = types.MethodType(explicit_self_attention, m)
            n += 1
    return n


def remove_explicit_attention(model: torch.nn.Module) -> None:
    """Undo `use_explicit_attention`: the blocks call nn.MultiheadAttention again."""
    for m in model.modules():
        if isinstance(m, ResidualAttentionBlock):
            m.__dict__.pop("attention", None)
