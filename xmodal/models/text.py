"""Text encoding without the padding. open_clip's CLIP text tower runs all `context_length` positions of
every caption, but with its causal mask and end-of-text (argmax) pooling, no position after a caption's own
end-of-text token can change that caption's feature. So xmodal's text tower runs:

- only as many positions as the longest caption of the batch (the trim);
- in every block but the last, the linear layers and the MLP only for each caption's own tokens, its first
  position to its end-of-text (the packing). The rows are packed into one [tokens, d] matrix; attention
  places them back into the batch's [n, t] layout, where the causal mask keeps every padded key out of
  reach of every real query;
- the last block for the end-of-text rows only (xmodal/models/pooled.py).

The same embeddings (the same formula; only float rounding differs, as the matmuls see fewer rows) for a
fraction of the work: shapes captions fill ~72 % of the trimmed positions, emoji names and keywords ~34 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock

from xmodal.models.attention import attend
from xmodal.models.pooled import can_pool_last, pooled_rows, run_block

# Packing runs when the captions' own tokens are under this share of the trimmed [n, t] positions. Measured
# (benchmarks/step_variants.py): 1.03x at 72 % (shapes), 1.14x at 34 % (emoji); near 100 % its gather and
# scatter are pure cost, so the plain trimmed batch runs.
PACK_BELOW = 0.9
# The packed row count is rounded up to a multiple of this (see packed_positions). Unrounded, the sizes of
# the packed matrices change every step and glibc's heap, kept by xmodal/train/allocator.py, fragments:
# 150 steps of `xmodal train` (xm-tiny, emoji) peaked at 2863 MiB RSS, rounded at 1419, unpacked at 1420.
PACK_MULTIPLE = 64


def can_trim(model: torch.nn.Module) -> bool:
    return (
        type(model) is CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def _unpack(z: torch.Tensor, index: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """Packed rows [m, c] back into the batch's [n, t, c] layout (zeros where the padding was)."""
    return z.new_zeros(n * t, z.shape[-1]).index_copy(0, index, z).view(n, t, -1)


def packed_positions(ends: torch.Tensor, t: int, multiple: int) -> torch.Tensor:
    """The [n, t] positions to run: each caption's own tokens (up to its end-of-text at `ends`), plus the
    first padding positions (in flat order) that round the count up to a multiple of `multiple`. The
    rounding keeps the packed matrices to a few sizes, so the allocator reuses their memory from step to
    step; a padding row is harmless, as the causal mask keeps it from every real query and its output
    reaches no loss."""
    valid = torch.arange(t, device=ends.device) <= ends[:, None]
    extra = min(-int(valid.sum()) % multiple, valid.numel() - int(valid.sum()))
    pad = ~valid
    return valid | (pad & (pad.view(-1).cumsum(0).view_as(pad) <= extra))


def packed_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    index: torch.Tensor,
    shape: tuple[int, int],
    attn_mask: torch.Tensor,
    ends: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`block` on packed rows. x: [m, d], the rows of an [n, t, d] batch at flat positions `index`
    (caption·t + position); attn_mask: the block's causal float [t, t]. With `rows` (the [n] indices into
    x of the end-of-text rows, at positions `ends`) it returns those rows of the output only ([n, d], as
    `pooled.last_block_row`), else every packed row ([m, d])."""
    attn = block.attn
    (n, t), d, h = shape, x.shape[-1], attn.num_heads
    y = block.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    if rows is None:
        qkv = _unpack(F.linear(y, w, b), index, n, t).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask, xr = attn_mask, x
    else:
        q = F.linear(y[rows], w[:d], None if b is None else b[:d]).view(n, h, 1, d // h)
        kv = _unpack(F.linear(y, w[d:], None if b is None else b[d:]), index, n, t)
        k, v = kv.view(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask, xr = attn_mask[ends].view(n, 1, 1, t), x[rows]
    out = attend(q, k, v, mask.to(q.dtype), attn.dropout if attn.training else 0.0)
    out = out.reshape(n, d) if rows is not None else out.transpose(1, 2).reshape(n * t, d)[index]
    xr = xr + block.ls_1(attn.out_proj(out))
    return xr + block.ls_2(block.mlp(block.ln_2(xr)))


def packed_pooled_rows(
    model: CLIP, text: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The text transformer's output at each caption's end-of-text row ([n, d]), every block run on the
    packed rows (see the module). text: [n, t] trimmed tokens; ends: [n] end-of-text positions."""
    n, t = text.shape
    keep = packed_positions(ends, t, PACK_MULTIPLE)
    index = keep.view(-1).nonzero().squeeze(1)
    rows = keep.view(-1).cumsum(0)[torch.arange(n, device=text.device) * t + ends] - 1  # end-of-text rows
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text.reshape(-1)[index]).to(cast_dtype)
    x = x + model.positional_embedding[index % t].to(cast_dtype)
    *body, last = model.transformer.resblocks
    gc = model.transformer.grad_checkpointing
    for block in body:
        x = run_block(lambda z, blk=block: packed_block(blk, z, index, (n, t), mask), gc, x)
    return run_block(lambda z: packed_block(last, z, index, (n, t), mask, ends, rows), gc, x)


def encode_text(model: torch.nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """model.encode_text(text) without the padding's work (see the module)."""
    if not can_trim(model):
        return model.encode_text(text, normalize=normalize)
    end = text.argmax(dim=-1)  # the end-of-text token has the highest id
    n = int(end.max().item()) + 1
    text = text[:, :n]
    mask = model.attn_mask[:n, :n]
    pool_last = can_pool_last(model.transformer)
    if pool_last and float((end + 1).sum()) < PACK_BELOW * text.numel():
        x = packed_pooled_rows(model, text, end, mask)
    else:
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        if pool_last:
            x = pooled_rows(model.transformer, x, end, mask)
        else:
            x = model.transformer(x, attn_mask=mask)[torch.arange(len(end), device=x.device), end]
    x = model.ln_final(x)  # one LayerNorm per row: the same before or after pooling
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return F.normalize(x, dim=-1) if normalize else x
