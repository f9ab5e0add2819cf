"""CoCa captioning: the teacher-forced decoder pass that the `caption` objective trains, and decoding
(greedy, beam search, nucleus sampling) for `xmodal caption`, captioning metrics and search.

open_clip's CoCa runs the text tower causally over the caption (a [CLS] appended at the end gives the
contrastive text feature) and a multimodal decoder that cross-attends to the image tokens of the
attentional pooler. Two things here differ from calling open_clip's `forward` / `generate`, with the
same results:

* the vocabulary projection (width × 49,408, the largest matmul of a small CoCa) runs only where a label
  counts — at non-padding positions in training, at the last position when decoding — and in training
  the loss and its gradient come from one chunked pass that never stores the logits;
* decoding works on the rows still running, and beam search is our own (open_clip's needs
  `transformers.BeamSearchScorer`, which recent transformers releases no longer have).

Greedy decoding reproduces `CoCa.generate(generation_type="top_k", top_k=1)` token for token: the same
minimum length (the end token is barred below `min_len` tokens), the end token forced at `max_len`, and
a row ends at the end token *or* at open_clip's pad id 0 (which is also the BPE token "!").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import UserError

SOT, EOT = 49406, 49407  # open_clip's BPE start/end-of-text ids (CoCa.generate's defaults)


def is_coca(model: nn.Module) -> bool:
    from open_clip.coca_model import CoCa

    return isinstance(model, CoCa)


def check_coca(model: nn.Module, what: str) -> None:
    if not is_coca(model):
        raise UserError(
            f"{what}: the model has no caption decoder (it is a {type(model).__name__}); train a CoCa model, "
            "e.g. xmodal train --model xm-coca-tiny --objective clip+caption:2"
        )


def coca_encode(
    model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image feature b×D, text feature b×D, both unnormalised; image tokens b×N×W for the decoder, text
    tokens b×L×W) from one pass of each tower."""
    img, image_embs = model._encode_image(pixels, normalize=False)
    txt, token_embs = model._encode_text(ids, normalize=False)
    return img, txt, image_embs, token_embs


def decoder_hidden(decoder: nn.Module, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
    """open_clip's `MultimodalTransformer.forward` up to its final LayerNorm (before the vocabulary
    projection): causal self-attention over the text, cross-attention to the image tokens, per layer."""
    n = text_embs.shape[1]
    if not decoder.batch_first:
        image_embs, text_embs = image_embs.transpose(0, 1), text_embs.transpose(0, 1)
    mask = decoder.attn_mask[:n, :n]
    x = text_embs
    for block, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        if decoder.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(block, x, None, None, mask, use_reentrant=False)
            x = checkpoint(cross, x, image_embs, image_embs, None, use_reentrant=False)
        else:
            x = block(x, attn_mask=mask)
            x = cross(x, k_x=image_embs, v_x=image_embs)
    if not decoder.batch_first:
        x = x.transpose(0, 1)
    return decoder.ln_final(x)


def _vocab(decoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h @ decoder.text_projection


def caption_hidden(
    model: nn.Module, image_embs: torch.Tensor, token_embs: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: (decoder states n×W, labels n) at the positions whose label is not open_clip's pad
    id. Position t sees the caption up to token t and predicts token t+1, as `CoCa.forward` pairs them."""
    labels = ids[:, 1:]
    keep = labels != model.pad_id
    h = decoder_hidden(model.text_decoder, image_embs, token_embs[:, :-1])
    return h[keep], labels[keep]


def caption_logits(
    model: nn.Module, image_embs: torch.Tensor, token_embs: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits n×V, labels n) at the counted positions (see `caption_hidden`)."""
    h, labels = caption_hidden(model, image_embs, token_embs, ids)
    return _vocab(model.text_decoder, h), labels


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i −log softmax(h_i W)_{y_i} and its gradients in one pass over chunks of rows: the n×V logits
    (V = 49,408) are never kept, and the softmax's gradient is formed in place. The matmuls run in the
    autocast dtype where autocast is on (as `h @ W` would), the softmax in float32."""

    @staticmethod
    def forward(ctx, h, w, labels, dtype, chunk):  # noqa: D102
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        wd = w.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need else None
        for i in range(0, len(h), chunk):
            hc, y = h[i : i + chunk].to(dtype), labels[i : i + chunk]
            z = (hc @ wd).float()
            lse = z.logsumexp(dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if need:
                z.sub_(lse[:, None]).exp_()  # softmax
                z[torch.arange(len(y), device=z.device), y] -= 1.0  # − one-hot: d loss / d logits
                g = z.to(dtype)
                grad_h[i : i + chunk] = g @ wd.T
                grad_w += (hc.T @ g).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad).to(ctx.dtypes[0]), (grad_w * grad).to(ctx.dtypes[1]), None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int = 256):
    """`F.cross_entropy(h @ w, labels, reduction="sum")` without materialising the logits."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, w, labels, dtype, chunk)


# -- decoding -------------------------------------------------------------------------------------


@dataclass
class Decoding:
    """How to turn the decoder's distributions into a caption."""

    max_len: int = 30  # tokens, start and end token included (open_clip's seq_len)
    min_len: int = 5  # the end token is barred while a caption is shorter than this
    beam: int = 1  # beams; 1 = greedy
    top_p: float | None = None  # nucleus sampling instead of greedy/beam
    temperature: float = 1.0
    seed: int = 0  # for top_p
    length_penalty: float = 1.0  # beam scores are log-probability / length**length_penalty

    def check(self, context_length: int) -> None:
        if not 2 <= self.max_len <= context_length:
            raise UserError(f"--max-len {self.max_len}: give 2…{context_length} (the model's context length)")
        if not 0 <= self.min_len < self.max_len:
            raise UserError(f"--min-len {self.min_len}: give 0…{self.max_len - 1} (below --max-len)")
        if self.beam < 1:
            raise UserError(f"--beam {self.beam}: give 1 (greedy) or more beams")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p}: give a probability mass in (0, 1]")
        if self.top_p is not None and self.beam > 1:
            raise UserError("--beam and --top-p: choose one way of decoding")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: give a positive number")


def _next_logits(model: nn.Module, image_embs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's logits for the token after `ids` (b×t), for each row."""
    _, token_embs = model._encode_text(ids, normalize=False)
    h = decoder_hidden(model.text_decoder, image_embs, token_embs)
    return _vocab(model.text_decoder, h[:, -1]).float()


def _constrain(logits: torch.Tensor, cur_len: int, d: Decoding) -> torch.Tensor:
    if cur_len < d.min_len:
        logits[:, EOT] = float("-inf")
    if cur_len + 1 >= d.max_len:  # the last slot: only the end token
        forced = torch.full_like(logits, float("-inf"))
        forced[:, EOT] = 0.0
        return forced
    return logits


@torch.no_grad()
def generate(model: nn.Module, pixels: torch.Tensor, d: Decoding | None = None) -> torch.Tensor:
    """Token ids b×T for normalised pixels: the start token first, open_clip's pad id after the end."""
    d = d or Decoding()
    check_coca(model, "caption")
    d.check(model.text.context_length)
    was_training = model.training
    model.eval()
    try:
        _, image_embs = model._encode_image(pixels, normalize=False)
        if d.beam > 1:
            return _beam_search(model, image_embs, d)
        return _sample(model, image_embs, d)
    finally:
        model.train(was_training)


def _sample(model: nn.Module, image_embs: torch.Tensor, d: Decoding) -> torch.Tensor:
    b, pad = len(image_embs), model.pad_id
    gen = torch.Generator(device=image_embs.device).manual_seed(d.seed) if d.top_p is not None else None
    out = torch.full((b, 1), SOT, dtype=torch.long, device=image_embs.device)
    while out.shape[1] < d.max_len:
        running = (out[:, -1] != EOT) & (out[:, -1] != pad)
        if not running.any():
            break
        nxt = torch.full((b,), pad, dtype=torch.long, device=out.device)
        logits = _constrain(_next_logits(model, image_embs[running], out[running]), out.shape[1], d)
        if d.top_p is None:
            nxt[running] = logits.argmax(dim=-1)
        else:
            nxt[running] = _nucleus(logits / d.temperature, d.top_p, gen)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


def _nucleus(logits: torch.Tensor, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability reaches `top_p` (Holtzman et al. 2020)."""
    probs = F.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
    pick = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(1, pick).squeeze(1)


def _beam_search(model: nn.Module, image_embs: torch.Tensor, d: Decoding) -> torch.Tensor:
    """Standard beam search: K beams per image; a hypothesis ends at the end token and is scored by its
    summed log-probability over length**length_penalty; an image is done once it has K ended ones."""
    b, k, dev = len(image_embs), d.beam, image_embs.device
    embs = image_embs.repeat_interleave(k, dim=0)
    seqs = torch.full((b * k, 1), SOT, dtype=torch.long, device=dev)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam at the start: identical beams would fill the top-K with copies
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    while seqs.shape[1] < d.max_len and alive.any():
        cur = seqs.shape[1]
        logp = F.log_softmax(_constrain(_next_logits(model, embs, seqs), cur, d), dim=-1)
        cand = (scores[:, :, None] + logp.view(b, k, -1)).view(b, -1)
        top_s, top_i = cand.topk(2 * k, dim=1)
        new_seqs, new_scores = seqs.view(b, k, -1).clone(), torch.full_like(scores, float("-inf"))
        nxt = torch.full((b, k), model.pad_id, dtype=torch.long, device=dev)
        vocab = logp.shape[-1]
        for i in range(b):
            if not alive[i]:
                continue
            filled = 0
            for s, idx in zip(top_s[i].tolist(), top_i[i].tolist(), strict=True):
                if s == float("-inf"):
                    break
                beam, tok = divmod(idx, vocab)
                if tok == EOT:
                    ids = seqs[i * k + beam].tolist() + [EOT]
                    finished[i].append((s / (len(ids) - 1) ** d.length_penalty, ids))
                    continue
                new_seqs[i, filled] = seqs[i * k + beam]
                nxt[i, filled], new_scores[i, filled] = tok, s
                filled += 1
                if filled == k:
                    break
            if len(finished[i]) >= k or filled == 0:
                alive[i] = False
        seqs = torch.cat([new_seqs.view(b * k, -1), nxt.view(-1, 1)], dim=1)
        scores = new_scores
    best = []
    for i in range(b):
        if finished[i]:
            best.append(max(finished[i], key=lambda h: h[0])[1])
        else:  # no beam ended (cannot happen with the forced end token; kept for safety)
            best.append(seqs[i * k + int(scores[i].argmax())].tolist())
    width = max(len(s) for s in best)
    return torch.tensor([s + [model.pad_id] * (width - len(s)) for s in best], dtype=torch.long, device=dev)


def ids_to_text(tokenizer, ids: torch.Tensor) -> list[str]:
    """Captions from generated ids: the tokens between the start token and the first end/pad token."""
    out = []
    for row in ids.tolist():
        toks = []
        for t in row[1:]:
            if t in (EOT, 0):
                break
            toks.append(t)
        out.append(tokenizer.decode(toks).strip())
    return out


@torch.no_grad()
def caption_images(
    encoder, images: torch.Tensor, d: Decoding | None = None, batch_size: int = 64
) -> list[str]:
    """A caption per uint8 image (N×3×S×S at the model's size), through the encoder's preprocessing."""
    d = d or Decoding()
    check_coca(encoder.model, "caption")
    d.check(encoder.model.text.context_length)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(encoder.device).float().div_(255)
        with encoder._autocast():
            ids = generate(encoder.model, encoder.normalize_pixels(x), d)
        out += ids_to_text(encoder.tokenizer, ids.cpu())
    return out


# -- training pass (caption loss, SyCoCa's attentive masking and TG-MIM) ------------------------------


TGMIM_DEFAULTS: dict[str, Any] = {"depth": 1, "heads": None}


class TgMimLayer(nn.Module):
    """Pre-LN block of the TG-MIM image decoder: self-attention over the image tokens, cross-attention to
    the caption's tokens (padding masked), MLP — the text decoder's layer with the modalities swapped."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_text, self.ln_mlp = (nn.LayerNorm(width) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        t = self.ln_text(text)
        x = x + self.cross_attn(self.ln_cross(x), t, t, key_padding_mask=text_pad, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


class TgMimDecoder(nn.Module):
    """SyCoCa's image decoder: masked image tokens (a learned mask token plus a slot embedding) are
    rebuilt from the visible ones and the caption."""

    def __init__(self, width: int, text_width: int, n_tokens: int, depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.slot = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.text_in = nn.Linear(text_width, width)
        self.layers = nn.ModuleList(TgMimLayer(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, width)

    def forward(
        self, tokens: torch.Tensor, masked: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor
    ) -> torch.Tensor:
        x = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens) + self.slot
        t = self.text_in(text)
        for layer in self.layers:
            x = layer(x, t, text_pad)
        return self.head(self.ln(x))


def attach_tgmim(model: nn.Module, cfg: dict[str, Any] | None) -> TgMimDecoder:
    """Build the TG-MIM image decoder for a CoCa model and hang it on `model.tgmim`."""
    check_coca(model, "--objective tgmim")
    c = {**TGMIM_DEFAULTS, **(cfg or {})}
    if set(c) - set(TGMIM_DEFAULTS):
        raise UserError(f"model config tgmim: {cfg!r}; give a dict with keys {sorted(TGMIM_DEFAULTS)}")
    width = int(model.text_decoder.width)
    n = int(model.visual.attn_pool.query.shape[0]) - 1 if model.visual.attn_pool is not None else None
    if n is None or model.visual.attn_pool_contrastive is not None:
        raise UserError("--objective tgmim: needs open_clip's default CoCa pooling (attentional_pool: true)")
    heads = int(c["heads"] or max(1, width // 32))
    model.tgmim = TgMimDecoder(width, int(model.text.width), n, int(c["depth"]), heads)
    return model.tgmim


@torch.no_grad()
def token_relevance(model: nn.Module, image_embs: torch.Tensor, token_embs: torch.Tensor, ids: torch.Tensor):
    """SyCoCa's attentive masking score, b×N: each image token's highest cosine similarity to a word of
    its caption, both in the contrastive space (the towers' own projections; no gradient)."""
    from xmodal.models.tokens import _project

    v = F.normalize(_project(image_embs, model.visual.proj).float(), dim=-1)
    t = F.normalize(_project(model.text.ln_final(token_embs), model.text.text_projection).float(), dim=-1)
    words = (ids != model.pad_id) & (ids != SOT) & (ids != EOT)
    words = torch.where(words.any(dim=1, keepdim=True), words, ids != model.pad_id)  # empty caption
    sim = torch.einsum("bnd,bld->bnl", v, t).masked_fill(~words[:, None, :], float("-inf"))
    return sim.amax(dim=-1)


@dataclass
class CaptionOut:
    """What the captioning objectives read from one training pass."""

    loss_sum: torch.Tensor  # Σ of the caption cross-entropy over the positions whose label counts
    n_labels: int  # how many positions those are
    mim_pred: torch.Tensor | None = None  # m×W, TG-MIM's rebuilt image tokens
    mim_target: torch.Tensor | None = None  # m×W, the image tokens they replace (no gradient)


def caption_forward(
    model: nn.Module,
    pixels: torch.Tensor,
    ids: torch.Tensor,
    drop_low: float = 0.0,
    mim_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, CaptionOut]:
    """One CoCa training pass: normalised contrastive features and the captioning outputs.

    `drop_low` (SyCoCa's r_l): the captioning decoder cross-attends only to the image tokens ranked above
    the least caption-relevant share `drop_low`. `mim_ratio` (r_h): that share of the *most* relevant image
    tokens is masked and rebuilt by the TG-MIM decoder from the others and the caption."""
    img, txt, image_embs, token_embs = coca_encode(model, pixels, ids)
    n = image_embs.shape[1]
    rel = token_relevance(model, image_embs, token_embs, ids) if drop_low > 0 or mim_ratio else None
    cap_embs = image_embs
    if drop_low > 0:
        keep = max(1, n - round(drop_low * n))
        idx = rel.topk(keep, dim=1).indices
        cap_embs = image_embs.gather(1, idx[..., None].expand(-1, -1, image_embs.shape[-1]))
    h, labels = caption_hidden(model, cap_embs, token_embs, ids)
    out = CaptionOut(linear_cross_entropy_sum(h, model.text_decoder.text_projection, labels), len(labels))
    if mim_ratio:
        m = max(1, round(mim_ratio * n))
        masked = torch.zeros_like(rel, dtype=torch.bool).scatter_(1, rel.topk(m, dim=1).indices, True)
        pred = model.tgmim(image_embs, masked, token_embs, ids == model.pad_id)
        out.mim_pred, out.mim_target = pred[masked], image_embs.detach()[masked]
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), out
