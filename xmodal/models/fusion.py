"""The fusion encoder (ALBEF/BLIP): a few transformer layers in which the caption's tokens attend to each
other (both directions) and, by cross-attention, to the image's patch tokens. Its output at the first
position (CLIP's start token, BERT's [CLS]) is the joint [CLS] of the pair; heads on it:

* `itm_head`: image–text matching, 2 logits (no match, match);
* the MLM head: dense → GELU → LayerNorm to the text tower's width, then the text tower's own token
  embedding matrix (tied, as BERT's and ALBEF's heads are) plus a bias, one logit per vocabulary entry.

Inputs are the towers' hidden states *before* their projections into the joint space: the text tower's
output at every position (after `ln_final`) and the ViT's patch tokens (after `ln_post`, class token left
out). Both are projected to the fusion width first, so the towers can have any widths.

The module hangs on the open_clip model as `model.fusion`, so checkpoints, the EMA copy of momentum
objectives, optimiser groups and gradient averaging see it like any other parameter. The model config
carries it as `"fusion": {"width", "depth", "heads", "mlp_ratio"}`; `build_model` pops that key before
building the open_clip model and attaches the module. open_clip's towers never see it, and an export
writes it beside them (`fusion.safetensors` + `fusion.json`).

Masked captions: CLIP's BPE vocabulary has no [MASK] token, so a learned `mask_embedding` replaces the
token embedding at masked positions (for Hugging Face towers too, through `inputs_embeds`), which leaves
the ids — and CLIP's end-of-text pooling and padding trim, which read them — untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import UserError

# width None: the text tower's width; heads None: one per 32 channels
FUSION_DEFAULTS: dict[str, Any] = {"width": None, "depth": 2, "heads": None, "mlp_ratio": 4.0}
_WHY = "the fusion encoder needs hidden states; "


class FusionLayer(nn.Module):
    """Pre-LN block: self-attention over the text, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_mlp = (
            nn.LayerNorm(width),
            nn.LayerNorm(width),
            nn.LayerNorm(width),
        )
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, pad: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.ln_cross(x)
        x = x + self.cross_attn(h, image, image, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


class FusionEncoder(nn.Module):
    def __init__(
        self,
        text_width: int,
        image_width: int,
        vocab_size: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        tied: bool = True,
    ) -> None:
        super().__init__()
        if width % heads:
            raise UserError(f"fusion: width {width} is not a multiple of heads {heads}")
        self.text_in = nn.Linear(text_width, width)
        self.image_in = nn.Linear(image_width, width)
        self.layers = nn.ModuleList(FusionLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_out = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 2)
        self.mlm_dense = nn.Linear(width, text_width)
        self.mlm_ln = nn.LayerNorm(text_width)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        # untied only where the text tower has no token-embedding matrix to share
        self.mlm_decoder = None if tied else nn.Linear(text_width, vocab_size, bias=False)
        self.mask_embedding = nn.Parameter(torch.randn(text_width) * 0.02)

    def forward(self, text: torch.Tensor, text_attn: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text b×L×Wt (True in `text_attn` b×L on real positions), image b×N×Wv → fused b×L×width."""
        x, img, pad = self.text_in(text), self.image_in(image), ~text_attn
        for layer in self.layers:
            x = layer(x, pad, img)
        return self.ln_out(x)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """b×L×width → b×2 (class 1 = the pair matches), from the first position."""
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, rows: torch.Tensor, token_embedding: torch.Tensor | None) -> torch.Tensor:
        """n×width fused rows → n×V vocabulary logits (tied to `token_embedding` V×Wt when given)."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(rows)))
        weight = token_embedding if self.mlm_decoder is None else self.mlm_decoder.weight
        return h @ weight.to(h.dtype).T + self.mlm_bias.to(h.dtype)


# -- the towers' hidden states ------------------------------------------------------------------


@dataclass
class Hidden:
    """One pass of both towers: pooled features (projected, not normalised) and the hidden states."""

    image: torch.Tensor  # b×D pooled
    text: torch.Tensor  # b×D pooled
    image_hidden: torch.Tensor  # b×N×Wv patch tokens
    text_hidden: torch.Tensor  # b×L×Wt every position
    text_ids: torch.Tensor  # b×L the ids, trimmed like text_hidden
    text_attn: torch.Tensor  # b×L True from the start token to the end token


def _text_module(model: nn.Module) -> nn.Module:
    """The object holding token_embedding/positional_embedding/transformer/ln_final (CLIP itself or an
    open_clip TextTransformer), or a Hugging Face tower."""
    from open_clip.model import CLIP, CustomTextCLIP

    if type(model) is CLIP:
        return model
    if isinstance(model, CustomTextCLIP):
        return model.text
    raise UserError(_WHY + f"{type(model).__name__} models do not provide them")


def _is_hf(tower: nn.Module) -> bool:
    from open_clip.hf_model import HFTextEncoder

    return isinstance(tower, HFTextEncoder)


def text_widths(model: nn.Module) -> tuple[int, int]:
    """(text tower width, vocabulary size) for sizing the fusion encoder and its MLM head."""
    t = _text_module(model)
    if _is_hf(t):
        emb = t.transformer.get_input_embeddings()
        return int(emb.weight.shape[1]), int(emb.weight.shape[0])
    if getattr(t, "cls_emb", None) is not None:
        raise UserError(_WHY + "a text tower with an appended class token (CoCa) does not provide them yet")
    return int(t.token_embedding.weight.shape[1]), int(t.token_embedding.weight.shape[0])


def token_embedding(model: nn.Module) -> torch.Tensor:
    t = _text_module(model)
    return t.transformer.get_input_embeddings().weight if _is_hf(t) else t.token_embedding.weight


def special_ids(model: nn.Module) -> list[int]:
    """Ids never selected for masking nor drawn as random replacements (start, end, padding, …)."""
    t = _text_module(model)
    if _is_hf(t):
        cfg = t.config  # BERT-style configs name the padding id only; [CLS]/[SEP] are excluded by position
        ids = {
            getattr(cfg, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id")
        }
        return sorted(i for i in ids if i is not None)
    vocab = int(t.token_embedding.weight.shape[0])
    return [0, vocab - 2, vocab - 1]  # CLIP BPE: padding 0, start-of-text, end-of-text (the highest ids)


def check_fusion_supported(model: nn.Module) -> None:
    """Raise the UserError the fusion path would raise, before training starts."""
    from xmodal.models.tokens import _check_visual

    _check_visual(model.visual, _WHY)
    t = _text_module(model)
    text_widths(model)
    if not _is_hf(t) and getattr(t, "text_pool_type", getattr(t, "pool_type", None)) not in ("argmax", "eos"):
        raise UserError(_WHY + "the text tower's pool type is not 'argmax' or 'eos'")


def image_hidden(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled b×D, patch tokens b×N×Wv) from one pass of the ViT, on normalised pixels."""
    from xmodal.models.tokens import _image_unprojected

    return _image_unprojected(model, pixels)


def text_hidden(
    model: nn.Module,
    ids: torch.Tensor,
    masked: torch.Tensor | None = None,
    mask_embedding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled b×D, hidden b×L×Wt, ids b×L, attn b×L): the text tower at every position. Where `masked`
    (b×L_ids bool) is True the token embedding is replaced by `mask_embedding`. CLIP towers with
    end-of-text pooling are trimmed after the batch's longest caption, as `encode_text` does."""
    from open_clip.transformer import text_global_pool

    from xmodal.models.tokens import _project

    t = _text_module(model)
    if _is_hf(t):
        pad = t.config.pad_token_id
        attn = ids != pad
        emb = t.transformer.get_input_embeddings()(ids)
        if masked is not None:
            emb = torch.where(masked[..., None], mask_embedding.to(emb.dtype), emb)
        out = t.transformer(inputs_embeds=emb, attention_mask=attn.long())
        pooled = t.proj(t.pooler(out, attn.long()))
        return pooled, out.last_hidden_state, ids, attn
    pool_type = getattr(t, "text_pool_type", getattr(t, "pool_type", "argmax"))
    eos_id = getattr(t, "text_eos_id", getattr(t, "eos_id", None))
    end = ids.argmax(dim=-1) if pool_type == "argmax" else (ids == eos_id).int().argmax(dim=-1)
    n = int(end.max().item()) + 1 if getattr(t, "attn_mask", None) is not None else ids.shape[1]
    ids = ids[:, :n]
    if masked is not None:
        masked = masked[:, :n]
    cast = t.transformer.get_cast_dtype()
    x = t.token_embedding(ids).to(cast)
    if masked is not None:
        x = torch.where(masked[..., None], mask_embedding.to(cast), x)
    x = x + t.positional_embedding[:n].to(cast)
    mask = t.attn_mask[:n, :n] if getattr(t, "attn_mask", None) is not None else None
    x = t.ln_final(t.transformer(x, attn_mask=mask))
    pooled = text_global_pool(x, ids, pool_type, eos_token_id=eos_id)
    pos = torch.arange(n, device=ids.device)
    return _project(pooled, t.text_projection), x, ids, pos <= end[:, None]


def encode_hidden(model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor) -> Hidden:
    img, img_h = image_hidden(model, pixels)
    txt, txt_h, ids, attn = text_hidden(model, ids)
    return Hidden(img, txt, img_h, txt_h, ids, attn)


def tokens_from_hidden(model: nn.Module, h: Hidden) -> dict[str, torch.Tensor]:
    """The token features FILIP uses (`xmodal.models.tokens`), from the same pass's hidden states."""
    from xmodal.models.tokens import _project

    t = _text_module(model)
    proj = t.proj if _is_hf(t) else t.text_projection
    pos = torch.arange(h.text_ids.shape[1], device=h.text_ids.device)
    return {
        "image_tokens": F.normalize(_project(h.image_hidden, model.visual.proj).float(), dim=-1),
        "text_tokens": F.normalize(_project(h.text_hidden, proj).float(), dim=-1),
        "text_mask": h.text_attn & (pos >= 1),
    }


def pad_to(x: torch.Tensor, length: int, value: Any = 0) -> torch.Tensor:
    """Pad dimension 1 of `x` to `length`."""
    if x.shape[1] >= length:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad, value=value)


# -- attaching and finding the module -------------------------------------------------------------


def fusion_config(value: Any) -> dict[str, Any]:
    """The model config's `fusion` entry with defaults filled; a UserError for unknown keys."""
    cfg = dict(FUSION_DEFAULTS)
    if value in (None, True):
        return cfg
    if not isinstance(value, dict) or set(value) - set(FUSION_DEFAULTS):
        raise UserError(f"model config fusion: {value!r}; give a dict with keys {sorted(FUSION_DEFAULTS)}")
    cfg.update(value)
    return cfg


def attach_fusion(model: nn.Module, cfg: dict[str, Any]) -> FusionEncoder:
    """Build the fusion encoder for `model`'s towers and hang it on `model.fusion`."""
    check_fusion_supported(model)
    text_width, vocab = text_widths(model)
    image_width = int(model.visual.conv1.out_channels)  # the ViT's width
    c = fusion_config(cfg)
    width = int(c["width"] or text_width)
    heads = int(c["heads"] or max(1, width // 32))
    model.fusion = FusionEncoder(
        text_width, image_width, vocab, width, int(c["depth"]), heads, float(c["mlp_ratio"])
    )
    return model.fusion


def load_exported_fusion(model: nn.Module, folder: Any) -> dict[str, Any]:
    """Attach the fusion encoder that `xmodal export` wrote to `folder` (fusion.json + fusion.safetensors)
    and return its config; one-line errors naming the file that is missing or does not fit."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "fusion.safetensors"
    try:
        cfg = json.loads((folder / "fusion.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'fusion.json'}: not valid JSON ({e.msg}); re-export the run") from e
    if not weights.is_file():
        raise UserError(f"{folder}: has fusion.json but no fusion.safetensors; re-export the run")
    fusion = attach_fusion(model, cfg)
    try:
        fusion.load_state_dict(load_file(weights))
    except (RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{weights}: does not fit the fusion config in fusion.json ({first}); re-export"
        ) from e
    return cfg


def fusion_of(model: nn.Module, where: str = "the model") -> FusionEncoder:
    f = getattr(model, "fusion", None)
    if f is None:
        raise UserError(
            f"{where} has no fusion encoder (ITM/MLM head); train one with --objective clip+itm (or +mlm)"
        )
    return f


def has_fusion(model: nn.Module) -> bool:
    return getattr(model, "fusion", None) is not None


# -- scoring pairs (eval, search and serve re-rank with this) --------------------------------------


@torch.no_grad()
def itm_scores(
    model: nn.Module,
    text_h: torch.Tensor,
    text_attn: torch.Tensor,
    image_h: torch.Tensor,
    batch_size: int = 256,
) -> torch.Tensor:
    """Match scores (log-odds: logit(match) − logit(no match)) of aligned pairs: text states b×L×Wt with
    attention b×L against image states b×N×Wv, in batches. Log-odds rank exactly as ALBEF's softmax
    probability does, without its saturation at 1.0."""
    fusion = fusion_of(model)
    out = []
    for i in range(0, len(text_h), batch_size):
        logits = fusion.itm_logits(
            fusion(text_h[i : i + batch_size], text_attn[i : i + batch_size], image_h[i : i + batch_size])
        ).float()
        out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out) if out else torch.empty(0)


class PairScorer:
    """ITM scores for re-ranking with an `Encoder` whose model has a fusion encoder: the towers' hidden
    states of images and captions (computed in batches, kept by the caller for reuse), then the fusion
    pass over aligned (caption, image) pairs, k candidates of a query costing k batched fusion passes."""

    def __init__(self, encoder: Any, batch_size: int = 256) -> None:
        self.encoder = encoder
        self.model = encoder.model
        fusion_of(self.model, encoder.name)
        self.batch_size = batch_size
        self.context = int(encoder.model_cfg["text_cfg"].get("context_length", 77))

    @torch.no_grad()
    def image_states(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×S×S → float32 N×P×Wv patch states, on the CPU."""
        enc, out = self.encoder, []
        with self._eval():
            for i in range(0, len(images), self.batch_size):
                x = images[i : i + self.batch_size].to(enc.device).float().div_(255)
                with enc._autocast():
                    out.append(image_hidden(self.model, enc.normalize_pixels(x))[1].float().cpu())
        width = int(self.model.visual.conv1.out_channels)
        return torch.cat(out) if out else torch.empty(0, 0, width)

    @torch.no_grad()
    def text_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions → (float32 N×C×Wt states, N×C attention), padded to the context length C."""
        enc, states, attns = self.encoder, [], []
        with self._eval():
            for i in range(0, len(texts), self.batch_size):
                ids = enc.tokenize(texts[i : i + self.batch_size]).to(enc.device)
                with enc._autocast():
                    _, h, _, attn = text_hidden(self.model, ids)
                states.append(pad_to(h.float(), self.context).cpu())
                attns.append(pad_to(attn, self.context, False).cpu())
        if not states:
            return torch.empty(0, self.context, text_widths(self.model)[0]), torch.empty(
                0, self.context, dtype=torch.bool
            )
        return torch.cat(states), torch.cat(attns)

    @torch.no_grad()
    def score(
        self, text_states: torch.Tensor, text_attn: torch.Tensor, image_states: torch.Tensor
    ) -> torch.Tensor:
        """Match log-odds of aligned pairs (row i of each input), float32 on the CPU."""
        if len(text_states) == 0:
            return torch.empty(0)
        n = int(text_attn.sum(1).max())  # positions past every caption's end change nothing
        dev, out = self.encoder.device, []
        with self._eval():
            for i in range(0, len(text_states), self.batch_size):
                sl = slice(i, i + self.batch_size)
                with self.encoder._autocast():
                    out.append(
                        itm_scores(
                            self.model,
                            text_states[sl, :n].to(dev),
                            text_attn[sl, :n].to(dev),
                            image_states[sl].to(dev),
                        ).cpu()
                    )
        return torch.cat(out)

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        """Eval mode for the call; switched (a walk over every module) only when the model trains."""
        was = self.model.training
        if was:
            self.model.eval()
        try:
            yield
        finally:
            if was:
                self.model.train()
