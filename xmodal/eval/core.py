"""Shared pieces of the evaluation suite: task names, options, the per-run context."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xmodal.errors import UserError
from xmodal.eval.cache import EmbeddingCache
from xmodal.eval.metrics import TIES

TASKS = ("retrieval", "zeroshot", "probe", "hubness", "gap", "robustness", "captioning", "hashing", "compat")
POSITIVES = ("caption", "label")
DEFAULT_TEMPLATES_FILE = Path(__file__).parent / "templates.txt"


@dataclass
class EvalOptions:
    """Every knob of every task (the CLI flags map 1:1 onto these; `evaluate(**task_options)` too)."""

    positives: str | None = None  # None: only the paired image/caption; "caption" | "label": more positives
    templates: list[str] | None = None  # zero-shot prompt templates, "{}" = class name
    ties: str = "topk"
    ks: tuple[int, ...] = (1, 5, 10)
    map_k: int = 10
    hubness_k: int = 10
    seed: int = 0
    # hubness correction of retrieval scores (xmodal.index.hubness): reported beside the raw numbers
    hubness_norm: str | None = None  # qbnorm | qbnorm-dynamic | dbnorm | dbnorm-dynamic | invgc | localadj
    hubness_bank: str | None = None  # manifest whose images and captions form the banks (e.g. train split)
    hubness_beta: float = 20.0
    # ITM re-ranking of retrieval (xmodal.eval.rerank): reported beside the raw numbers
    rerank: str | None = None  # "itm": re-score each query's ITC top rerank_k by the fusion encoder
    rerank_k: int = 16
    score: str = "cosine"  # the compositional probe's pair score: cosine | itm
    # modality gap
    gap_max_items: int = 2000  # per modality, for uniformity and the linear classifier (seeded subsample)
    gap_test_size: float = 0.3
    # robustness
    typo_rate: float = 0.3  # chance per word of one character edit (at least one per caption)
    attribute_words: int = 1  # attribute words inserted per caption
    noise_std: float = 0.08  # Gaussian noise σ in [0, 1] pixel units
    blur_sigma: float = 1.0  # Gaussian blur σ in pixels at the model's input size
    jpeg_quality: int = 20
    pgd_eps: float = 4 / 255  # L∞ radius in [0, 1] pixel units
    pgd_steps: int = 10
    pgd_step_size: float = 1 / 255
    pgd_images: int = 100  # attack a seeded subset of this many images (0 = skip PGD)
    pgd_random_start: bool = True
    # captioning (CoCa models; xmodal.eval.captioning)
    caption_beam: int = 1  # beams; 1 = greedy
    caption_max_len: int = 30  # tokens, start and end token included
    caption_baseline: str | None = None  # training manifest: also score each image's nearest train caption
    caption_gallery: int = 24  # images in the report's captioning gallery
    # hashing (xmodal.eval.hashing): mAP@hash_k with label relevance, learned codes against ITQ and LSH
    hash_k: int = 100
    hash_bits: tuple[int, ...] = (32, 64, 128)  # the ITQ / LSH baselines' code lengths
    # compat (xmodal.eval.compat): the evaluated model is the new one; the old one embeds the gallery
    compat_old: Any = None  # model source (run dir, export, config) or an Encoder
    compat_projection: Any = None  # projection folder (`xmodal compat fit`) or a Projection
    # report
    gallery_queries: int = 6
    progress: bool = False

    @classmethod
    def from_kwargs(cls, **kw: Any) -> EvalOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"evaluate() got unknown task options {unknown}; known: {sorted(names)}")
        keep_none = ("positives", "templates", "hubness_norm", "hubness_bank", "rerank", "caption_baseline")
        opts = cls(**{k: v for k, v in kw.items() if v is not None or k in keep_none})
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.positives not in (None, *POSITIVES):
            raise UserError(f"--positives {self.positives}: choose one of {', '.join(POSITIVES)}")
        if self.ties not in TIES:
            raise UserError(f"--ties {self.ties}: choose one of {', '.join(TIES)}")
        for name in ("map_k", "hubness_k", "hash_k"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
        if not (
            0 <= self.pgd_eps <= 1
            and self.pgd_steps >= 0
            and self.pgd_step_size >= 0
            and self.pgd_images >= 0
        ):
            raise UserError(
                "--pgd-eps must be in [0, 1] (pixel units, e.g. 4/255); steps, step size, images ≥ 0"
            )
        from xmodal.eval.rerank import RERANK, SCORES

        if self.rerank not in (None, *RERANK):
            raise UserError(
                f"--rerank {self.rerank}: choose {' or '.join(RERANK)} (re-score the top --rerank-k by ITM)"
            )
        if int(self.rerank_k) < 1:
            raise UserError(f"--rerank-k {self.rerank_k}: must be ≥ 1 (candidates re-scored per query)")
        if self.score not in SCORES:
            raise UserError(f"--score {self.score}: choose {' or '.join(SCORES)}")
        if self.templates is not None:
            check_templates(self.templates, "templates")
        if int(self.caption_beam) < 1:
            raise UserError(f"--beam {self.caption_beam}: give 1 (greedy) or more beams")
        if int(self.caption_max_len) < 2:
            raise UserError(f"--max-len {self.caption_max_len}: give at least 2 (start and end token)")
        if self.caption_baseline is not None and not Path(self.caption_baseline).exists():
            raise UserError(f"--caption-baseline {self.caption_baseline}: file not found")
        if self.hubness_norm not in (None, "none"):
            from xmodal.index.hubness import METHODS

            if self.hubness_norm not in METHODS:
                raise UserError(f"--hubness-norm {self.hubness_norm}: choose one of {', '.join(METHODS)}")
            if not self.hubness_bank:
                raise UserError(
                    f"--hubness-norm {self.hubness_norm} needs --hubness-bank MANIFEST "
                    "(queries and gallery items to normalise against, e.g. the training split)"
                )
            if not Path(self.hubness_bank).exists():
                raise UserError(f"--hubness-bank {self.hubness_bank}: file not found")


def check_templates(templates: list[str], where: str) -> None:
    if not templates:
        raise UserError(f"--templates {where}: no templates (one per line, each with {{}})")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise UserError(
            f"--templates {where}: template {bad[0]!r} has no {{}} placeholder for the class name"
        )


def read_templates(path: str | Path) -> list[str]:
    """One template per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--templates {path}: file not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    check_templates(templates, str(path))
    return templates


def fill_template(template: str, name: str) -> str:
    return template.replace("{c}", name).replace("{}", name)


@dataclass
class EvalContext:
    """What every task gets: the encoder, the data, the shared embedding cache and the options."""

    encoder: Any
    data: Any
    cache: EmbeddingCache
    options: EvalOptions
    artifacts: dict[str, Any] = field(default_factory=dict)  # plot inputs for the report (not JSON)

    def log(self, msg: str) -> None:
        if self.options.progress:
            print(f"[eval] {msg}", file=sys.stderr, flush=True)

    @property
    def labels(self) -> list[str | None]:
        labels = getattr(self.data, "labels", None)
        return list(labels) if labels is not None else [None] * self.cache.n_images

    @property
    def extras(self) -> list[dict]:
        extras = getattr(self.data, "extras", None)
        return [e or {} for e in extras] if extras is not None else [{} for _ in range(self.cache.n_images)]
