"""Robustness: relative drop of R@1 under seeded text/image perturbations, and a PGD attack on
image→text retrieval (L∞, through the differentiable `encoder.embed_pixels`)."""

from __future__ import annotations

import io
import math
import random
import string
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import topk_hits
from xmodal.eval.retrieval import positives_for

ATTRIBUTE_WORDS = (
    "small",
    "large",
    "bright",
    "dark",
    "old",
    "shiny",
    "striped",
    "wooden",
    "tiny",
    "huge",
    "colorful",
    "plastic",
    "metal",
    "round",
    "square",
    "broken",
)


# -- text perturbations -----------------------------------------------------------------------------
def _edit_word(word: str, rng: random.Random) -> str:
    """One character edit (swap adjacent / delete / insert / replace) that changes the word."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    for _ in range(10):
        op = rng.choice(("swap", "delete", "insert", "replace"))
        i = rng.choice(letters)
        if op == "swap" and i + 1 < len(word):
            new = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif op == "delete" and len(word) > 1:
            new = word[:i] + word[i + 1 :]
        elif op == "insert":
            new = word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
        else:
            new = word[:i] + rng.choice(string.ascii_lowercase.replace(word[i].lower(), "")) + word[i + 1 :]
        if new != word:
            return new
    return word + rng.choice(string.ascii_lowercase)


def typo(text: str, rng: random.Random, rate: float = 0.3) -> str:
    """Each word with ≥ 2 letters gets one character edit with probability `rate` (at least one word)."""
    words = text.split(" ")
    eligible = [i for i, w in enumerate(words) if sum(ch.isalpha() for ch in w) >= 2]
    if not eligible:
        return text + rng.choice(string.ascii_lowercase)
    chosen = [i for i in eligible if rng.random() < rate] or [rng.choice(eligible)]
    for i in chosen:
        words[i] = _edit_word(words[i], rng)
    return " ".join(words)


def insert_attributes(text: str, rng: random.Random, n: int = 1) -> str:
    """Insert `n` attribute words (from ATTRIBUTE_WORDS) before randomly chosen words (not the first
    word when there are several, so "a red cube" → "a red shiny cube" or "a shiny red cube")."""
    words = text.split(" ")
    for _ in range(n):
        pos = rng.randint(1, len(words) - 1) if len(words) > 1 else 0
        words.insert(pos, rng.choice(ATTRIBUTE_WORDS))
    return " ".join(words)


# -- image perturbations (uint8 N×3×S×S in, uint8 out) ----------------------------------------------
def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_noise(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return _to_uint8(images.float() / 255 + std * torch.randn(images.shape, generator=gen))


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    if sigma <= 0:
        return images.clone()
    ks = 2 * math.ceil(3 * sigma) + 1
    ks = min(ks, 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)  # reflect padding must fit the image
    return _to_uint8(gaussian_blur(images.float() / 255, [ks, ks], [sigma, sigma]))


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out) if out else images.clone()


# -- PGD ----------------------------------------------------------------------------------------------
@contextmanager
def _frozen(model: torch.nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def pgd_attack(
    encoder: Any,
    images: torch.Tensor,
    text_embs: torch.Tensor,
    positives: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    early_stop: bool = True,
) -> torch.Tensor:
    """L∞ PGD on [0, 1] pixels maximising the image→text cross-entropy of the true captions
    (−log Σ_pos softmax(scale · e·tᵀ)) against all texts. Returns the adversarial pixels (n×3×S×S float
    in [0, 1], CPU), within `eps` of images/255 in L∞.

    early_stop: an image whose current iterate already ranks a non-positive text first is frozen there
    (the attack keeps the first iterate that breaks R@1, as "best iterate" PGD does) and costs no more
    steps."""
    dev = encoder.device
    t = text_embs.to(dev)
    scale = float(getattr(encoder, "logit_scale", 100.0))
    gen = torch.Generator().manual_seed(seed)
    model = encoder.model
    was_training = model.training
    model.eval()
    out = []
    with _frozen(model):
        for s in range(0, len(images), batch_size):
            x0 = images[s : s + batch_size].float().div(255).to(dev)
            pos = positives[s : s + batch_size].to(dev)
            x = x0.clone()
            if random_start and eps > 0:
                x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(dev) * eps).clamp(0, 1)
            active = torch.arange(len(x0), device=dev)
            for _ in range(steps):
                xa = x[active].requires_grad_(True)
                logits = scale * encoder.embed_pixels(xa) @ t.T
                pa = pos[active]
                if early_stop:
                    still = pa.gather(1, logits.detach().topk(1, dim=1)[1]).squeeze(1)
                    if not bool(still.any()):
                        active = active[:0]
                        break
                else:
                    still = torch.ones(len(active), dtype=torch.bool, device=dev)
                loss = (logits.logsumexp(1) - logits.masked_fill(~pa, float("-inf")).logsumexp(1))[
                    still
                ].sum()
                (g,) = torch.autograd.grad(loss, xa)
                idx = active[still]
                step = x[idx] + step_size * g[still].sign()
                x[idx] = torch.minimum(torch.maximum(step, x0[idx] - eps), x0[idx] + eps).clamp(0, 1)
                active = idx
            out.append(x.detach().cpu())
    model.train(was_training)
    return torch.cat(out) if out else images.float()


# -- the task -----------------------------------------------------------------------------------------
def unavailable(ctx: EvalContext) -> str | None:
    if ctx.cache.n_images < 2:
        return "robustness needs at least 2 image-caption pairs"
    if getattr(ctx.data.images, "dtype", None) != torch.uint8:
        return "robustness needs the decoded uint8 images (N×3×S×S)"
    return None


def _drop(clean: float, pert: float) -> float | None:
    return None if clean <= 0 else (clean - pert) / clean


def run(ctx: EvalContext) -> dict[str, Any]:
    c, o = ctx.cache, ctx.options
    pos = positives_for(ctx)
    ties = o.ties

    has = pos.any(0)  # images with at least one caption (i2t queries)

    def r1(cap: torch.Tensor, img: torch.Tensor) -> dict[str, float]:
        s = cap @ img.T
        return {
            "t2i_R@1": float(topk_hits(s, pos, 1, ties).double().mean()),
            "i2t_R@1": float(topk_hits(s.T[has], pos.T[has], 1, ties).double().mean()),
        }

    clean = r1(c.caption_embs, c.images)
    out: dict[str, Any] = {"clean": clean}

    def record(name: str, kind: str, res: dict[str, float]) -> None:
        out[name] = {
            "kind": kind,
            **res,
            "t2i_rel_drop": _drop(clean["t2i_R@1"], res["t2i_R@1"]),
            "i2t_rel_drop": _drop(clean["i2t_R@1"], res["i2t_R@1"]),
        }

    # each distinct caption is perturbed once (identical captions stay identical), in first-seen order
    rng = random.Random(o.seed)
    typo_of = {u: typo(u, rng, o.typo_rate) for u in c.unique_captions}
    typos = [typo_of[t] for t in c.captions]
    record("typo", "text", r1(c.texts(typos), c.images))
    rng = random.Random(o.seed + 1)
    attr_of = {u: insert_attributes(u, rng, o.attribute_words) for u in c.unique_captions}
    attrs = [attr_of[t] for t in c.captions]
    record("attribute", "text", r1(c.texts(attrs), c.images))
    ctx.artifacts["perturbed_text_examples"] = list(zip(c.captions[:5], typos[:5], attrs[:5], strict=True))

    imgs = ctx.data.images
    enc = ctx.encoder
    for name, fn in (
        ("noise", lambda x: gaussian_noise(x, o.noise_std, o.seed)),
        ("blur", lambda x: blur(x, o.blur_sigma)),
        ("jpeg", lambda x: jpeg(x, o.jpeg_quality)),
    ):
        ctx.log(f"robustness: {name}")
        record(
            name, "image", r1(c.caption_embs, enc.encode_images(fn(imgs), batch_size=c.batch_size).float())
        )

    out["pgd"] = _pgd(ctx, pos)
    out["settings"] = {
        "seed": o.seed,
        "typo_rate": o.typo_rate,
        "attribute_words": o.attribute_words,
        "noise_std": o.noise_std,
        "blur_sigma": o.blur_sigma,
        "jpeg_quality": o.jpeg_quality,
    }
    return out


def _pgd(ctx: EvalContext, pos: torch.Tensor) -> dict[str, Any]:
    c, o = ctx.cache, ctx.options
    n = min(int(o.pgd_images), c.n_images)
    info: dict[str, Any] = {
        "eps": o.pgd_eps,
        "steps": o.pgd_steps,
        "step_size": o.pgd_step_size,
        "n_images": n,
        "random_start": o.pgd_random_start,
    }
    if n == 0 or not hasattr(ctx.encoder, "embed_pixels"):
        return {**info, "success_rate": None, "note": "PGD skipped (--pgd-images 0 or no embed_pixels)"}
    ctx.log(f"robustness: PGD on {n} images, {o.pgd_steps} steps")
    sub = torch.from_numpy(np.sort(np.random.default_rng(o.seed).choice(c.n_images, n, replace=False)))
    pos_i2t = pos.T[sub]
    before = topk_hits(c.images[sub] @ c.caption_embs.T, pos_i2t, 1, o.ties)
    # only images retrieved correctly before can be broken: the others are not attacked
    ok = before.nonzero().squeeze(1)
    after = torch.zeros_like(before)
    if len(ok):
        adv = pgd_attack(
            ctx.encoder,
            ctx.data.images[sub[ok]],
            c.caption_embs,
            pos_i2t[ok],
            eps=o.pgd_eps,
            steps=o.pgd_steps,
            step_size=o.pgd_step_size,
            random_start=o.pgd_random_start,
            seed=o.seed,
            batch_size=min(64, c.batch_size),
        )
        with torch.no_grad():
            adv_e = torch.cat(
                [
                    ctx.encoder.embed_pixels(adv[s : s + 64].to(ctx.encoder.device)).float().cpu()
                    for s in range(0, len(adv), 64)
                ]
            )
        after[ok] = topk_hits(adv_e @ c.caption_embs.T, pos_i2t[ok], 1, o.ties)
    n_before = int(before.sum())
    broken = int((before & ~after).sum())
    return {
        **info,
        "R@1_before": float(before.double().mean()),
        "R@1_after": float(after.double().mean()),
        "n_correct_before": n_before,  # = the images attacked
        "success_rate": broken / n_before if n_before else None,
        **(
            {} if n_before else {"note": "no attacked image was retrieved correctly at R@1 before the attack"}
        ),
    }
