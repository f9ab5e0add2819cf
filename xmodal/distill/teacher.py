"""The frozen teacher of `xmodal distill`: loaded once, kept in eval mode, its features computed once.

The teacher's image and caption embeddings of the whole training set are made by the crash-safe chunked
embedding of `index build` (`xmodal.index.embed.embed_collection`), from the images decoded at the
teacher's own resolution, and kept under the data cache folder, keyed by the teacher's weights, the data
and the precision. A second run (another student, another seed, a resume) reuses them, so distilling costs
little more than training the student. A different teacher or changed data gives a different key.

When augmentation changes the images (or captions) every step, cached features would describe other
inputs than the student sees: the teacher then runs live on the step's augmented batch (its pixels resized
to the teacher's resolution, its captions tokenised by the teacher's tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.models.encoder import Encoder, load_encoder
from xmodal.models.pooled import encode_image
from xmodal.models.text import encode_text


def load_teacher(source: str, pretrained: str | None, device: torch.device) -> Encoder:
    """The teacher as an Encoder, frozen and in eval mode. The caller's RNG state is left as it was, so
    that a student initialises the same with or without a teacher."""
    if pretrained and not Path(pretrained).is_file():
        raise UserError(f"--teacher-pretrained {pretrained}: file not found")
    src = Path(source)
    if not src.exists() and not pretrained:
        raise UserError(
            f"--teacher {source}: no such run or export folder (a model config needs "
            "--teacher-pretrained FILE)"
        )
    with torch.random.fork_rng(devices=[]):
        enc = load_encoder(source, pretrained=pretrained, device=str(device))
    if enc.random_init:
        raise UserError(f"--teacher {source}: a model config without weights; add --teacher-pretrained FILE")
    enc.model.eval().requires_grad_(False)
    return enc


class Teacher:
    """The teacher's (image, text) features of a step's rows: looked up in the cache, or computed live."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.image: torch.Tensor | None = None  # N×Dt, row i = training sample i (cached)
        self.text: torch.Tensor | None = None  # C×Dt, row c = flat caption c (cached)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.encoder.model.logit_scale.exp().detach().float().reshape(())

    @torch.no_grad()
    def features(
        self,
        samples: torch.Tensor,
        captions: torch.Tensor,
        pixels: Callable[[], torch.Tensor],
        texts: Callable[[], Sequence[str]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (b×Dt each, L2-normalised, float32) of training samples `samples` with flat captions
        `captions`; `pixels()` (the step's float pixels in [0, 1]) and `texts()` are called only when that
        side is not cached. Run inside the trainer's autocast."""
        dev = self.encoder.device
        if self.image is not None:
            img = self.image[samples].to(dev)
        else:
            x = pixels()
            size = self.encoder.image_size
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
                x = x.clamp_(0, 1)
            img = encode_image(self.encoder.model, self.encoder.normalize_pixels(x.to(dev)))
        if self.text is not None:
            txt = self.text[captions].to(dev)
        else:
            tok = self.encoder.tokenize(list(texts())).to(dev)
            txt = encode_text(self.encoder.model, tok)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    # -- the cache ---------------------------------------------------------------------------------
    def build_cache(
        self,
        data,
        load_at: Callable[[int], object],
        cache_root: Path,
        autocast_dtype: torch.dtype | None,
        images: bool,
        texts: bool,
        is_main: bool,
        barrier: Callable[[], None],
        log: Callable[[str], None] = print,
    ) -> dict:
        """Embed the training set (`data`, the student's ImageTextData) with the teacher once, or reuse
        the embedding of an earlier run; `load_at(size)` loads the same data at the teacher's resolution.
        Rank 0 computes, the other ranks then read the finished chunks. Returns what it did (for the log)."""
        from xmodal.index.embed import collection_from_dataset, embed_collection, encoder_fingerprint

        if not (images or texts):
            return {}
        t0 = time.perf_counter()
        size = self.encoder.image_size
        data_t = data if data.image_size == size else load_at(size)
        if list(data_t.keys) != list(data.keys) or list(data_t.captions) != list(data.captions):
            raise UserError(
                f"--teacher: the training data decoded at the teacher's {size} px differs from the student's "
                f"{data.image_size} px (some images fail at one size); clean the data (xmodal data check)"
            )
        coll = collection_from_dataset(data_t)
        key = hashlib.sha256(
            json.dumps([encoder_fingerprint(self.encoder), coll.fingerprint, str(autocast_dtype)]).encode()
        ).hexdigest()[:20]
        work = cache_root / "teacher-features" / key
        self.encoder.autocast_dtype = autocast_dtype  # the same precision as a live teacher would run at

        def embed(main: bool):
            say = (lambda m: log(f"teacher cache: {m}")) if main else (lambda m: None)
            return embed_collection(
                self.encoder, coll, work, caption_gallery=True, thumb_size=0, progress=main, log=say
            )

        emb = embed(True) if is_main else None
        barrier()
        emb = emb or embed(False)  # the other ranks read the chunks rank 0 wrote
        if images:
            self.image = torch.from_numpy(emb.vectors)
        if texts:
            self.text = torch.from_numpy(emb.caption_vectors)
            n_caps = sum(len(c) for c in data.captions)
            if len(self.text) != n_caps:
                raise RuntimeError(f"teacher cache: {len(self.text)} caption vectors for {n_caps} captions")
        return {
            "folder": str(work),
            "chunks_computed": emb.chunks_computed,
            "chunks_reused": emb.chunks_reused,
            "seconds": round(time.perf_counter() - t0, 2),
        }
