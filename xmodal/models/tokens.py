"""Pooled *and* per-token features in one forward pass of each tower, for token-level objectives (FILIP).

`encode_with_tokens(model, pixels, tokens)` returns

* `image_pooled`, `text_pooled` (b×D): exactly `model.encode_image(pixels, normalize=True)` and
  open_clip's `encode_text` on the trimmed tokens — the features the plain training path gives, to float
  rounding (it runs the last block for the pooled row only, xmodal/models/pooled.py);
* `image_tokens` (b×N×D): the ViT's patch tokens (the class token left out; fewer patches when patch
  dropout is on), after `ln_post`, projected by the same `visual.proj` as the pooled output;
* `text_tokens` (b×L×D): the text tower's per-position outputs projected by the pooled output's
  projection — open_clip CLIP: `ln_final` at every position @ `text_projection`; CustomTextCLIP with an
  open_clip text tower: the same; Hugging Face towers (`--hf-text`): `last_hidden_state` through the
  tower's `proj` (linear / MLP, applied per token);
* `text_mask` (b×L bool): True on the caption's real tokens after the start token, up to and including
  the end-of-text token (CLIP BPE: positions 1…argmax; HF: the non-padding positions after [CLS], [SEP]
  included). The start token is left out as in FILIP: in CLIP's causal tower its output sees only
  itself, so it is the same vector for every caption; HF's [CLS] is left out alike.

All five are float32 (under `torch.autocast` the towers run in bf16 and the outputs are cast up), the
features L2-normalised. open_clip 3.3.0 returns the towers' tokens *unprojected* (`output_tokens=True`
projects only the pooled output), so the projection is applied here. For open_clip CLIP the text tower
trims the padding as `xmodal.models.text.encode_text` does: L is then the batch's longest caption.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool

from xmodal.errors import UserError
from xmodal.models.text import can_trim

_WHY = "filip needs token features; "


def encode_with_tokens(
    model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_pooled, text_pooled, image_tokens, text_tokens, text_mask); see the module docstring."""
    img, img_tok = _image(model, pixels)
    txt, txt_tok, mask = _text(model, tokens)
    return (
        F.normalize(img, dim=-1).float(),
        F.normalize(txt, dim=-1).float(),
        F.normalize(img_tok.float(), dim=-1),
        F.normalize(txt_tok.float(), dim=-1),
        mask,
    )


def check_tokens_supported(model: torch.nn.Module) -> None:
    """Raise the UserError `encode_with_tokens` would, before any training starts."""
    _check_visual(model.visual)
    if type(model) is CLIP:
        _end_positions_rule(model.text_pool_type, getattr(model, "text_eos_id", None))
    elif isinstance(model, CustomTextCLIP):
        _check_custom_text(model.text)
    else:
        raise UserError(_WHY + f"{type(model).__name__} models do not provide them yet")


@contextlib.contextmanager
def _output_tokens(module: torch.nn.Module) -> Iterator[None]:
    """Run the tower's own forward with `output_tokens` on: (pooled, tokens) from one pass."""
    before = module.output_tokens
    module.output_tokens = True
    try:
        yield
    finally:
        module.output_tokens = before


def _project(x: torch.Tensor, proj: torch.Tensor | torch.nn.Module | None) -> torch.Tensor:
    if proj is None:
        return x
    if isinstance(proj, torch.nn.Module):
        return proj(x)
    return x @ proj


# -- image ------------------------------------------------------------------------------------


def _check_visual(visual: torch.nn.Module, why: str = _WHY) -> None:
    if not isinstance(visual, VisionTransformer):
        raise UserError(
            why + f"the {type(visual).__name__} image tower does not provide them yet (use a ViT)"
        )
    if visual.attn_pool is not None:
        raise UserError(why + "an attentional-pool image tower gives query tokens, not patch tokens")
    if visual.pool_type not in ("tok", "avg"):
        raise UserError(why + f"image pool_type {visual.pool_type!r} is not supported (use 'tok' or 'avg')")


def _image_unprojected(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled b×D, patch tokens b×N×W after ln_post, before the projection) from one ViT pass."""
    visual = model.visual
    _check_visual(visual)
    with _output_tokens(visual):
        pooled, tokens = visual(pixels)  # tokens: patch tokens (class token dropped), width W
    if visual.final_ln_after_pool:  # ln_post was applied to the pooled vector only
        tokens = visual.ln_post(tokens)
    return pooled, tokens


def _image(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, tokens = _image_unprojected(model, pixels)
    return pooled, _project(tokens, model.visual.proj)


# -- text -------------------------------------------------------------------------------------


def _end_positions_rule(pool_type: str, eos_id: int | None) -> str:
    if pool_type == "argmax":
        return "argmax"  # CLIP BPE: end-of-text has the highest id
    if pool_type == "eos" and eos_id is not None:
        return "eos"
    raise UserError(_WHY + f"text pool_type {pool_type!r} is not supported (use 'argmax' or 'eos')")


def _real_mask(text: torch.Tensor, rule: str, eos_id: int | None) -> torch.Tensor:
    """True on positions 1…end-of-text of each caption."""
    end = text.argmax(dim=-1) if rule == "argmax" else (text == eos_id).int().argmax(dim=-1)
    pos = torch.arange(text.shape[1], device=text.device)
    return (pos >= 1) & (pos <= end[:, None])


def _check_custom_text(tower: torch.nn.Module) -> None:
    from open_clip.hf_model import HFTextEncoder

    if isinstance(tower, HFTextEncoder):
        return
    if isinstance(tower, TextTransformer):
        if tower.cls_emb is not None:
            raise UserError(
                _WHY + "a text tower with an appended class token (CoCa) does not provide them yet"
            )
        _end_positions_rule(tower.pool_type, getattr(tower, "eos_id", None))
        return
    raise UserError(_WHY + f"the {type(tower).__name__} text tower does not provide them yet")


def _text(model: torch.nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if type(model) is CLIP:
        return _clip_text(model, text)
    if not isinstance(model, CustomTextCLIP):
        raise UserError(_WHY + f"{type(model).__name__} models do not provide them yet")
    tower = model.text
    _check_custom_text(tower)
    from open_clip.hf_model import ClsPooler, HFTextEncoder

    with _output_tokens(tower):
        pooled, tokens = tower(text)
    if isinstance(tower, HFTextEncoder):
        real = text != tower.config.pad_token_id
        if type(tower.pooler) is ClsPooler:  # open_clip already dropped the [CLS] position
            mask = real[:, 1:]
        else:
            mask = real.clone()
            mask[:, 0] = False
        return pooled, tower.proj(tokens), mask
    rule = _end_positions_rule(tower.pool_type, getattr(tower, "eos_id", None))
    return (
        pooled,
        _project(tokens, tower.text_projection),
        _real_mask(text, rule, getattr(tower, "eos_id", None)),
    )


def _clip_text(model: CLIP, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP.encode_text (trimmed like xmodal.models.text.encode_text), keeping every position."""
    eos_id = getattr(model, "text_eos_id", None)
    rule = _end_positions_rule(model.text_pool_type, eos_id)
    cast_dtype = model.transformer.get_cast_dtype()
    if can_trim(model):
        n = int(text.argmax(dim=-1).max().item()) + 1  # positions after this reach no token
        text = text[:, :n]
        x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    else:
        x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    pooled = text_global_pool(x, text, model.text_pool_type, eos_token_id=eos_id)
    proj = model.text_projection
    return _project(pooled, proj), _project(x, proj), _real_mask(text, rule, eos_id)
