"""Self-contained HTML report (`--report DIR`): metric tables, plots and a retrieval gallery, all
inlined as base64 data URIs so DIR/index.html opens anywhere; plots are also saved as PNG files."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import rank_order

THUMB = 96
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left} td.v{text-align:right;font-family:monospace}
.row{display:flex;align-items:flex-start;gap:8px;margin:10px 0}
.q{width:260px;font-size:13px;flex:none}
.thumb{border:4px solid #ccc;width:96px;height:96px;image-rendering:pixelated}
.thumb.ok{border-color:#1a9a2a}
.cap{font-size:12px;border:3px solid #ccc;padding:4px;width:150px;min-height:40px}
.cap.ok{border-color:#1a9a2a;background:#eefbea} .note{color:#777;font-size:12px}
img.plot{max-width:560px;border:1px solid #eee}
.cgrid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px;margin:10px 0}
.ccard{border:1px solid #ddd;border-radius:4px;padding:6px;font-size:12px}
.ccard .gen{font-weight:600;margin:4px 0} .ccard .base{color:#555;margin:2px 0}
.ccard ul{margin:4px 0;padding-left:16px;color:#444}
"""


def _data_uri_png(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(img: torch.Tensor, size: int = THUMB) -> bytes:
    """uint8 3×S×S → PNG bytes of a size×size thumbnail."""
    im = Image.fromarray(img.permute(1, 2, 0).numpy())
    im = im.resize((size, size), Image.NEAREST if im.width < size // 2 else Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_confusion(conf: np.ndarray, classes: list[str]) -> bytes:
    from matplotlib.figure import Figure

    n = len(classes)
    fig = Figure(figsize=(min(3 + 0.35 * n, 12), min(2.5 + 0.35 * n, 12)))
    ax = fig.subplots()
    rows = conf.sum(1, keepdims=True)
    im = ax.imshow(conf / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion (row-normalised)", fontsize=10)
    return _fig_png(fig)


def plot_nk(nk: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    for ax, d, title in zip(
        axes,
        ("t2i", "i2t"),
        ("images as gallery (text queries)", "texts as gallery (image queries)"),
        strict=True,
    ):
        v = np.asarray(nk[d])
        ax.hist(v, bins=np.arange(0, v.max() + 2) - 0.5 if v.max() < 60 else 40, color="#4a7bd0")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"N_{nk['k']} (k-occurrence)")
        ax.set_ylabel("gallery items")
    return _fig_png(fig)


def plot_gap(img: np.ndarray, txt: np.ndarray) -> bytes:
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    x = np.concatenate([img, txt])
    p = PCA(n_components=2, random_state=0).fit_transform(x) if len(x) >= 2 else np.zeros((len(x), 2))
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.scatter(p[: len(img), 0], p[: len(img), 1], s=6, alpha=0.6, label="images", color="#d0502a")
    ax.scatter(p[len(img) :, 0], p[len(img) :, 1], s=6, alpha=0.6, label="texts", color="#2a7bd0")
    ax.legend()
    ax.set_title("modality gap: PCA of embeddings")
    return _fig_png(fig)


HASH_DIRECTIONS = {"t2i": "text → image", "i2t": "image → text"}


def plot_hashing_pr(res: dict[str, Any], direction: str) -> bytes:
    """Precision against recall by Hamming radius, one curve per code (learned, itq-B, lsh-B), so codes of
    different lengths compare at equal recall rather than at equal radius."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    import matplotlib

    methods = res.get("methods", {})
    styles = {"itq": ("Blues", "-", "."), "lsh": ("Oranges", "--", ".")}  # darker shade: more bits
    for name, m in methods.items():
        curve = m.get(direction, {}).get("pr_curve")
        if not curve:
            continue
        family = name.split("-")[0]
        if family in styles:
            cmap, line, marker = styles[family]
            same = [n for n in methods if n.split("-")[0] == family]
            shade = 0.45 + 0.5 * same.index(name) / max(1, len(same) - 1)
            color = matplotlib.colormaps[cmap](shade)
        else:  # the model's own (learned) codes
            color, line, marker = "#111111", "-", "o"
        label = f"{name} ({m.get('bits')} bits)" if family == "learned" else name
        ax.plot(
            curve["recall"], curve["precision"], line, marker=marker, ms=3, lw=1.4, color=color, label=label
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"hashing {HASH_DIRECTIONS[direction]}: precision–recall by Hamming radius", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _fig_png(fig)


def _table(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flattened (key, value) rows; curves (lists of more than 12 values) stay in the JSON and the plots."""
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows.extend(_table(v, f"{prefix}{k}."))
        elif isinstance(v, list) and len(v) > 12:
            continue
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if v is None:
        return "—"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _html_table(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td class=v>{html.escape(_fmt(v))}</td></tr>" for k, v in _table(d)
    )
    return f"<table>{rows}</table>"


_HEADLINE = {
    "retrieval": (
        "t2i.R@1",
        "t2i.R@5",
        "t2i.R@10",
        "i2t.R@1",
        "i2t.R@5",
        "i2t.R@10",
        "RSUM",
        "rerank.k",
        "rerank.t2i.R@1",
        "rerank.i2t.R@1",
        "rerank.RSUM",
        "rerank.ms_per_query",
    ),
    "zeroshot": ("top1", "top5", "mean_per_class_recall"),
    "probe": ("score", "accuracy"),
    "hubness": ("t2i.skewness", "i2t.skewness"),
    "gap": ("gap", "linear_separability"),
    "robustness": ("typo.t2i_rel_drop", "noise.i2t_rel_drop", "pgd.success_rate"),
    "captioning": ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "baseline_nearest_train_caption.CIDEr"),
}


def _summary(results: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, keys in _HEADLINE.items():
        flat = dict(_table(results.get(task, {})))
        if "skipped" in flat:
            out[task] = "skipped: " + str(flat["skipped"])
            continue
        for k in keys:
            if k in flat:
                out[f"{task}.{k}"] = flat[k]
    return out


def gallery(ctx: EvalContext, n_queries: int, seed: int) -> str:
    """Sampled text queries with their top-5 images, sampled image queries with their top-5 captions;
    correct results get a green border. With --rerank, the same queries again in the re-ranked order."""
    from xmodal.eval.retrieval import positives_for

    c = ctx.cache
    if c.n_images == 0 or c.n_texts == 0 or n_queries <= 0:
        return "<p class=note>no gallery (no data)</p>"
    pos = positives_for(ctx)
    s = c.scores_t2i
    rows_i2t = torch.arange(c.n_images)
    views = [("", s, s.T, rows_i2t)]
    if "rerank_scores" in ctx.artifacts:  # re-ranked t2i (T×N), i2t (images with a positive × T)
        r_t2i, r_i2t, q_img = ctx.artifacts["rerank_scores"]
        row = torch.full((c.n_images,), -1, dtype=torch.long)
        row[q_img] = torch.arange(len(q_img))
        views.append((f", re-ranked by {ctx.options.rerank} (top {ctx.options.rerank_k})", r_t2i, r_i2t, row))
    gen = np.random.default_rng(seed)
    texts = sorted(gen.choice(c.n_texts, min(n_queries, c.n_texts), replace=False))
    images = sorted(gen.choice(c.n_images, min(n_queries, c.n_images), replace=False))
    k = min(5, c.n_images)
    kt = min(5, c.n_texts)
    thumbs: dict[int, str] = {}

    def thumb(i: int) -> str:
        if i not in thumbs:
            thumbs[i] = _data_uri_png(thumbnail(ctx.data.images[i]))
        return thumbs[i]

    parts = []
    for title, s_t2i, s_i2t, i2t_row in views:
        parts.append(f"<h2>Retrieval gallery: text → image{html.escape(title)}</h2>")
        for t in texts:
            order = rank_order(s_t2i[t : t + 1], pos[t : t + 1], "index")[0, :k].tolist()
            cells = "".join(
                f'<img class="thumb{" ok" if pos[t, i] else ""}" src="{thumb(i)}" alt="image {i}">'
                for i in order
            )
            parts.append(f"<div class=row><div class=q>“{html.escape(c.captions[t])}”</div>{cells}</div>")
        parts.append(f"<h2>Retrieval gallery: image → text{html.escape(title)}</h2>")
        for i in images:
            r = int(i2t_row[i])
            if r < 0:  # an image without a caption is no i2t query of the re-ranked lists
                continue
            order = rank_order(s_i2t[r : r + 1], pos.T[i : i + 1], "index")[0, :kt].tolist()
            caps = "".join(
                f'<div class="cap{" ok" if pos[t, i] else ""}">{html.escape(c.captions[t])}</div>'
                for t in order
            )
            parts.append(
                f'<div class=row><div class=q><img class=thumb src="{thumb(int(i))}" alt="query"></div>'
                f"{caps}</div>"
            )
    return "\n".join(parts)


def caption_gallery(ctx: EvalContext, res: dict[str, Any], n: int) -> str:
    """The captioning metrics (generated vs the nearest-train-caption baseline) and a grid of the first
    n scored test images: thumbnail, generated caption, baseline caption, the reference captions."""
    art = ctx.artifacts.get("captioning")
    if not art:
        return ""
    from xmodal.eval.captioning import METRICS

    rows = [("generated", res)]
    if "baseline_nearest_train_caption" in res:
        rows.append(("nearest train caption", res["baseline_nearest_train_caption"]))
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td class=v>{html.escape(_fmt(r.get(m)))}</td>" for m in METRICS)
        + "</tr>"
        for name, r in rows
    )
    d = res.get("decoding", {})
    parts = [
        "<h2>Captioning</h2>",
        f"<table><tr><th></th>{head}</tr>{body}</table>",
        f"<p class=note>{res.get('n_images')} images · decoding: {html.escape(str(d.get('method')))} "
        f"(beam {d.get('beam')}, max_len {d.get('max_len')}) · tokenizer: "
        f"{html.escape(str(res.get('tokenizer')))} · BLEU/METEOR/ROUGE-L in [0, 1], CIDEr as "
        "pycocoevalcap returns it (papers print ×100)</p>",
    ]
    parts += [f"<p class=note>{html.escape(str(x))}</p>" for x in res.get("notes", [])]
    cards = []
    base = art.get("baseline")
    for j, i in enumerate(art["ids"][: max(n, 0)]):
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in art["references"][j])
        b = f"<div class=base>nearest train caption: {html.escape(base[j])}</div>" if base else ""
        cards.append(
            f'<div class=ccard><img class=thumb src="{_data_uri_png(thumbnail(ctx.data.images[i]))}" '
            f'alt="image {i}"><div class=gen>{html.escape(art["predictions"][j])}</div>{b}'
            f"<div class=note>references:</div><ul>{refs}</ul></div>"
        )
    parts.append(
        f"<h2>Captioning gallery (first {len(cards)} images)</h2><div class=cgrid>{''.join(cards)}</div>"
    )
    return "\n".join(parts)


def write_report(report_dir: str | Path, results: dict, ctx: EvalContext) -> Path:
    """Write DIR/results.json, DIR/index.html (self-contained) and the plots as DIR/*.png."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots: list[tuple[str, str, bytes]] = []
    a = ctx.artifacts
    if "confusion" in a:
        plots.append(("zeroshot", "confusion.png", plot_confusion(*a["confusion"])))
    if "nk" in a:
        plots.append(("hubness", "hubness_nk.png", plot_nk(a["nk"])))
    if "gap_points" in a:
        plots.append(("gap", "gap_pca.png", plot_gap(*a["gap_points"])))
    hashing = results.get("hashing")
    if isinstance(hashing, dict) and hashing.get("methods"):
        for d in HASH_DIRECTIONS:
            plots.append(("hashing", f"hashing_pr_{d}.png", plot_hashing_pr(hashing, d)))
    for _, name, png in plots:
        (out / name).write_bytes(png)

    meta = results.get("meta", {})
    body = [
        f"<h1>xmodal evaluation — {html.escape(str(meta.get('model', '')))}</h1>",
        f"<p class=note>data: {html.escape(str(meta.get('data', '')))} · {meta.get('n_images')} images · "
        f"{meta.get('n_texts')} texts · {meta.get('seconds')} s · "
        f"ties: {html.escape(str(meta.get('ties')))} · "
        f"positives: {html.escape(str(meta.get('positives')))}</p>",
    ]
    summary = _summary(results)
    if summary:
        body.append("<h2>summary</h2>" + _html_table(summary))
    body.append(gallery(ctx, ctx.options.gallery_queries, ctx.options.seed))
    if isinstance(results.get("captioning"), dict) and "skipped" not in results["captioning"]:
        body.append(caption_gallery(ctx, results["captioning"], ctx.options.caption_gallery))
    for task, res in results.items():
        if task == "meta":
            continue
        body.append(f"<h2>{html.escape(task)}</h2>")
        body.append(_html_table(res))
        for t, name, png in plots:
            if t == task:
                body.append(f'<p><img class=plot src="{_data_uri_png(png)}" alt="{name}"></p>')
    body.append("<h2>meta</h2>" + _html_table(meta))
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>xmodal eval</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
