"""Text encoding without the padding: open_clip's CLIP text tower runs all `context_length` positions,
but with its causal mask and end-of-text (argmax) pooling, positions after the longest caption in the
batch cannot change the result. Trimming them gives the same embeddings for a fraction of the work
(shapes captions use ~12 of 32 positions; real alt-text often ~20 of 77). The last block then runs for the
end-of-text rows only (xmodal/models/pooled.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool

from xmodal.models.pooled import can_pool_last, pooled_rows


def can_trim(model: torch.nn.Module) -> bool:
    return (
        type(model) is CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def encode_text(model: torch.nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """model.encode_text(text), skipping trailing positions no token of the batch reaches."""
    if not can_trim(model):
        return model.encode_text(text, normalize=normalize)
    end = text.argmax(dim=-1)  # the end-of-text token has the highest id
    n = int(end.max().item()) + 1
    text = text[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    mask = model.attn_mask[:n, :n]
    if can_pool_last(model.transformer):
        x = model.ln_final(pooled_rows(model.transformer, x, end, mask))
    else:
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return F.normalize(x, dim=-1) if normalize else x
