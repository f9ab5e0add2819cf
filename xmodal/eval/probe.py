"""Compositional probe (ARO / SugarCrepe style): does the image score its true caption above captions
with a swapped attribute, relation or object?

For each record with `negatives` the true caption is its first caption. An image passes a swap type
when s(image, true caption) > s(image, negative) for EVERY negative of that type (ties fail).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from xmodal.errors import UserError
from xmodal.eval.core import EvalContext

SWAP_TYPES = ("attribute", "relation", "object")


def _items(ctx: EvalContext) -> list[tuple[int, str, list[tuple[str, str]]]]:
    out = []
    for i, ex in enumerate(ctx.extras):
        negs = ex.get("negatives") or []
        if not negs:
            continue
        caps = ctx.data.captions[i]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps:
            continue
        pairs = []
        for n in negs:
            if isinstance(n, str):
                pairs.append((n, "other"))
            else:
                pairs.append((str(n["caption"]), str(n.get("type") or "other")))
        out.append((i, str(caps[0]), pairs))
    return out


def unavailable(ctx: EvalContext) -> str | None:
    if not _items(ctx):
        return 'no record has "negatives" (hard-negative captions) in the manifest'
    return None


def probe_scores(items: list[tuple[int, str, list[tuple[str, str]]]], image_embs, text_fn) -> dict[str, Any]:
    """Score the probe given image embeddings (N×D) and a function texts → embeddings (cosine)."""
    trues = text_fn([t for _, t, _ in items])
    neg_e = text_fn([c for _, _, ps in items for c, _ in ps])
    s_true = [float(image_embs[i] @ trues[row]) for row, (i, _, _) in enumerate(items)]
    rows = [i for i, _, ps in items for _ in ps]
    s_neg = [float(image_embs[i] @ neg_e[j]) for j, i in enumerate(rows)]
    return probe_results(items, s_true, s_neg)


def probe_results(
    items: list[tuple[int, str, list[tuple[str, str]]]], s_true: list[float], s_neg: list[float]
) -> dict[str, Any]:
    """Accuracies from s(image, true caption) per item and s(image, negative) per negative (flat, in
    item order): an image passes a swap type when its true caption beats every negative of that type."""
    per_type_img: dict[str, list[bool]] = defaultdict(list)
    per_type_pair: dict[str, list[bool]] = defaultdict(list)
    overall_img: list[bool] = []
    j = 0
    for row, (_, _, pairs) in enumerate(items):
        wins: dict[str, list[bool]] = defaultdict(list)
        for _, typ in pairs:
            wins[typ].append(s_true[row] > s_neg[j])
            j += 1
        for typ, w in wins.items():
            per_type_img[typ].append(all(w))
            per_type_pair[typ].extend(w)
        overall_img.append(all(all(w) for w in wins.values()))
    by_type = {
        typ: {
            "accuracy": sum(per_type_img[typ]) / len(per_type_img[typ]),
            "pair_accuracy": sum(per_type_pair[typ]) / len(per_type_pair[typ]),
            "n_images": len(per_type_img[typ]),
            "n_pairs": len(per_type_pair[typ]),
        }
        for typ in sorted(
            per_type_img,
            key=lambda t: (t not in SWAP_TYPES, SWAP_TYPES.index(t) if t in SWAP_TYPES else 0, t),
        )
    }
    all_pairs = [w for ws in per_type_pair.values() for w in ws]
    return {
        "accuracy": sum(overall_img) / len(overall_img),
        "pair_accuracy": sum(all_pairs) / len(all_pairs),
        "by_type": by_type,
        "n_images": len(overall_img),
        "n_pairs": len(all_pairs),
    }


def run(ctx: EvalContext) -> dict[str, Any]:
    if (why := unavailable(ctx)) is not None:
        raise UserError(f"--task probe: {why}")
    items = _items(ctx)
    if ctx.options.score == "itm":
        from xmodal.eval.rerank import probe_itm

        out = probe_results(items, *probe_itm(ctx, items))
    else:
        out = probe_scores(items, ctx.cache.images, ctx.cache.texts)
    return {"score": ctx.options.score, **out}
