"""ITM re-ranking of retrieval (the ALBEF / BLIP protocol): each query's top-k gallery items by the dual
encoder's cosine (ITC) are re-scored by the fusion encoder's image–text matching head and ranked by that
score; items beyond the top k keep their ITC order after the k re-ranked ones.

The re-ranked lists are turned back into a score matrix (`reranked_scores`) so that R@K, median rank,
MRR and mAP come from the same metric code, positives and tie rule as plain retrieval. The matrix holds
exact integer dense ranks (ITC ranks below every candidate's ITM rank), so equal scores stay equal and
distinct ones stay distinct: the `--ties` rule acts on the re-ranked lists exactly as it does on ITC.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from xmodal.errors import UserError
from xmodal.eval.metrics import rank_order, retrieval_metrics

RERANK = ("itm",)
SCORES = ("cosine", "itm")
_CHUNK = 1024


def check_requests(tasks: list[str], rerank: str | None, score: str) -> None:
    """A flag that would change nothing for the chosen tasks is an error, not a silent no-op."""
    if rerank is not None and "retrieval" not in tasks:
        raise UserError(f"--rerank {rerank} re-ranks retrieval; add retrieval to --task (or drop --rerank)")
    if score != "cosine" and "probe" not in tasks:
        raise UserError(
            f"--score {score} scores the compositional probe; add probe to --task (or drop --score)"
        )


def require_fusion(encoder: Any, flag: str) -> None:
    """One-line UserError naming `flag` when the model has no fusion encoder (ITM head)."""
    from xmodal.models.fusion import has_fusion

    if not has_fusion(getattr(encoder, "model", None)):
        name = getattr(encoder, "name", "the model")
        raise UserError(
            f"{flag}: {name} has no fusion encoder (ITM head); train the model with --objective clip+itm"
        )


def dense_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Q×G float32 per-row dense ranks (0 = lowest; equal scores share a rank, distinct ones do not)."""
    scores = torch.as_tensor(scores)
    out = torch.empty(scores.shape, dtype=torch.float32)
    for s in range(0, len(scores), _CHUNK):
        v, perm = torch.sort(scores[s : s + _CHUNK], dim=1, stable=True)
        step = torch.zeros(v.shape, dtype=torch.long)
        step[:, 1:] = v[:, 1:] != v[:, :-1]
        out[s : s + _CHUNK].scatter_(1, perm, step.cumsum(1).float())
    return out


def candidates(scores: torch.Tensor, positives: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """Q×min(k, G) gallery indices of each query's ITC top-k, chosen under the tie rule (torch.topk for
    "topk", the rule's sort order otherwise)."""
    k = min(int(k), scores.shape[1])
    out = []
    for s in range(0, len(scores), _CHUNK):
        sc, pos = scores[s : s + _CHUNK], positives[s : s + _CHUNK]
        if ties == "topk":
            out.append(torch.topk(sc, k, dim=1)[1])
        else:
            out.append(rank_order(sc, pos, ties)[:, :k])
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def reranked_scores(scores: torch.Tensor, cand: torch.Tensor, cand_scores: torch.Tensor) -> torch.Tensor:
    """The re-ranked lists as a Q×G score matrix: `cand` (Q×k gallery indices) get G + their dense rank
    by `cand_scores` (Q×k), every other item its dense ITC rank (< G); exact in float32 below 2^24."""
    g = scores.shape[1]
    out = dense_ranks(scores)
    if cand.numel():
        out.scatter_(1, cand, g + dense_ranks(cand_scores))
    return out


class PairCache:
    """ITM scores of (caption string, image) pairs, each pair through the fusion encoder once: the towers'
    states of every image and distinct caption are computed once and indexed into."""

    def __init__(self, encoder: Any, images: torch.Tensor, texts: list[str], batch_size: int = 256) -> None:
        from xmodal.models.fusion import PairScorer

        self.scorer = PairScorer(encoder, batch_size=batch_size)
        self.batch_size = int(batch_size)
        self.rows = {t: j for j, t in enumerate(dict.fromkeys(texts))}
        self.image_states = self.scorer.image_states(images)
        states, attn = self.scorer.text_states(list(self.rows))
        n = max(int(attn.sum(1).max()), 1) if len(attn) else attn.shape[1]
        self.text_states, self.text_attn = states[:, :n], attn[:, :n]  # padding past the longest is inert
        self.n_pairs = 0  # fusion passes run
        self._memo: dict[int, float] = {}  # pair key (text row × n_images + image row) → ITM score

    def text_rows(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.rows[t] for t in texts], dtype=torch.long)

    def score(self, text_rows: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """ITM log-odds of pairs (text_rows[i], image_rows[i]); a pair seen before (in this call or an
        earlier one) is not scored again."""
        text_rows, image_rows = text_rows.reshape(-1), image_rows.reshape(-1)
        if text_rows.numel() == 0:
            return torch.empty(0)
        n_img = max(len(self.image_states), 1)
        keys, inverse = torch.unique(text_rows * n_img + image_rows, return_inverse=True)
        new = torch.tensor([k not in self._memo for k in keys.tolist()], dtype=torch.bool)
        todo = keys[new]
        t, i = todo // n_img, todo % n_img
        for s in range(0, len(todo), self.batch_size):
            tb, ib = t[s : s + self.batch_size], i[s : s + self.batch_size]
            scores = self.scorer.score(self.text_states[tb], self.text_attn[tb], self.image_states[ib])
            self._memo.update(zip(todo[s : s + self.batch_size].tolist(), scores.tolist(), strict=True))
        self.n_pairs += len(todo)
        return torch.tensor([self._memo[k] for k in keys.tolist()], dtype=torch.float32)[inverse]


def rerank_retrieval(ctx: Any, pos: torch.Tensor, has: torch.Tensor) -> dict[str, Any]:
    """Both directions re-ranked by ITM within the ITC top --rerank-k; metrics as plain retrieval."""
    o, c = ctx.options, ctx.cache
    t0 = time.perf_counter()
    pairs = PairCache(ctx.encoder, ctx.data.images, c.captions, c.batch_size)
    caption_rows = pairs.text_rows(c.captions)  # caption instance → distinct-string row
    s = c.scores_t2i
    # text → image: queries are caption instances, candidates images
    cand_t2i = candidates(s, pos, o.rerank_k, o.ties)
    itm_t2i = pairs.score(caption_rows[:, None].expand_as(cand_t2i), cand_t2i).view(cand_t2i.shape)
    s_t2i = reranked_scores(s, cand_t2i, itm_t2i)
    # image → text: queries are the images with a positive, candidates caption instances
    q_img = has.nonzero().flatten()
    s_i2t_itc, pos_i2t = s.T[has], pos.T[has]
    cand_i2t = candidates(s_i2t_itc, pos_i2t, o.rerank_k, o.ties)
    itm_i2t = pairs.score(caption_rows[cand_i2t], q_img[:, None].expand_as(cand_i2t)).view(cand_i2t.shape)
    s_i2t = reranked_scores(s_i2t_itc, cand_i2t, itm_i2t)
    seconds = time.perf_counter() - t0

    t2i = retrieval_metrics(s_t2i, pos, o.ks, o.map_k, o.ties)
    i2t = retrieval_metrics(s_i2t, pos_i2t, o.ks, o.map_k, o.ties)
    ctx.artifacts["rerank_scores"] = (s_t2i, s_i2t, q_img)  # for the report's re-ranked gallery
    n_queries = len(s) + len(q_img)
    from xmodal.eval.retrieval import _rsum

    return {
        "score": o.rerank,
        "k": int(o.rerank_k),
        "t2i": t2i,
        "i2t": i2t,
        "RSUM": _rsum(t2i, i2t),
        "fusion_pairs": pairs.n_pairs,
        "seconds": round(seconds, 3),
        "ms_per_query": round(1000 * seconds / max(n_queries, 1), 3),
    }


def probe_itm(
    ctx: Any, items: list[tuple[int, str, list[tuple[str, str]]]]
) -> tuple[list[float], list[float]]:
    """ITM log-odds of (image, true caption) per probe item and of (image, negative) per negative, flat."""
    img_idx = sorted({i for i, _, _ in items})
    img_row = {i: r for r, i in enumerate(img_idx)}
    texts = [t for _, t, _ in items] + [n for _, _, ps in items for n, _ in ps]
    images = ctx.data.images[torch.tensor(img_idx, dtype=torch.long)]
    pairs = PairCache(ctx.encoder, images, texts, ctx.cache.batch_size)
    true_img = torch.tensor([img_row[i] for i, _, _ in items], dtype=torch.long)
    neg_img = torch.tensor([img_row[i] for i, _, ps in items for _ in ps], dtype=torch.long)
    s_true = pairs.score(pairs.text_rows([t for _, t, _ in items]), true_img)
    s_neg = pairs.score(pairs.text_rows([n for _, _, ps in items for n, _ in ps]), neg_img)
    return s_true.tolist(), s_neg.tolist()
