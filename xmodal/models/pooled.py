"""The towers' last block, run for the one row the pooling reads.

CLIP-style towers pool one row of their last block's output: the image tower its class token ('tok'
pooling), the text tower its end-of-text token (argmax pooling). The last block still computes every other
row — their queries, attention, output projection and MLP — and the pooling throws them away. Only the keys
and values need every row. Running the rest of the last block for the pooled row alone gives the same
features (the same formula; only float rounding differs, as the matmuls see fewer rows) and skips, forward
and backward:

- image: with xm-tiny's 3 blocks of 65 tokens, (65·10 − 10)/(65·12·3 + patch embedding) ≈ 27 % of the tower's
  matmul FLOPs (the last block's keys and values, 2 of its 12 d² per row, stay);
- text: the same share of the text tower, on the trimmed context.

open_clip computes every row. Objectives that read token outputs (MLM, ITM, captioning: the trainer's
"tokens" and "fusion" needs), ToMe and towers of other kinds take the towers' own full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch.utils.checkpoint import checkpoint

from xmodal.models.attention import attend


def _plain_block(block: torch.nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and isinstance(attn, torch.nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and not hasattr(block, "ln_1_kv")
    )


def can_pool_last(transformer: torch.nn.Module) -> bool:
    """`transformer` is open_clip's own batch-first Transformer (not ToMe's) of plain blocks."""
    return (
        type(transformer) is Transformer
        and transformer.batch_first
        and len(transformer.resblocks) > 0
        and all(_plain_block(b) for b in transformer.resblocks)
    )


def run_block(block: torch.nn.Module, grad_checkpointing: bool, *args):
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def last_block_row(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    rows: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`block(x, attn_mask=attn_mask)[arange(n), rows]` ([n, d]) without the other rows' work. x: [n, t, d]
    batch-first; rows: [n] positions (None: row 0, the class token); attn_mask: the block's float [t, t]."""
    attn = block.attn
    n, t, d = x.shape
    h = attn.num_heads
    y = block.ln_1(x)
    pick = (lambda z: z[:, 0]) if rows is None else (lambda z: z[torch.arange(n, device=z.device), rows])
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(pick(y), w[:d], None if b is None else b[:d]).view(n, h, 1, d // h)
    k, v = F.linear(y, w[d:], None if b is None else b[d:]).view(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
    mask = None
    if attn_mask is not None:
        mask = (attn_mask[:1] if rows is None else attn_mask[rows]).view(-1, 1, 1, t).to(q.dtype)
    out = attn.out_proj(attend(q, k, v, mask, attn.dropout if attn.training else 0.0).reshape(n, d))
    xr = pick(x) + block.ls_1(out)
    return xr + block.ls_2(block.mlp(block.ln_2(xr)))


def pooled_rows(
    transformer: Transformer, x: torch.Tensor, rows: torch.Tensor | None = None, attn_mask=None
) -> torch.Tensor:
    """`transformer(x, attn_mask)[arange(n), rows]`, the last block for those rows only (see the module)."""
    *body, last = transformer.resblocks
    gc = transformer.grad_checkpointing
    for block in body:
        x = run_block(block, gc, x, None, None, attn_mask)
    return run_block(lambda z: last_block_row(last, z, rows, attn_mask), gc, x)


def can_pool_image(visual: torch.nn.Module) -> bool:
    return (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and can_pool_last(visual.transformer)
    )


def encode_image(model: torch.nn.Module, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`model.encode_image(pixels, normalize)`, the image tower's last block for the class token only."""
    visual = getattr(model, "visual", None)
    if visual is None or not can_pool_image(visual):
        return model.encode_image(pixels, normalize=normalize)
    x = pooled_rows(visual.transformer, visual._embeds(pixels))
    x = visual.ln_post(x)  # one LayerNorm per row: the same before or after pooling (final_ln_after_pool)
    if visual.proj is not None:
        x = x @ visual.proj
    return F.normalize(x, dim=-1) if normalize else x
