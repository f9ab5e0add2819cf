"""The embedding cache: one model, one dataset, embeddings computed once and shared by every task.

Images are embedded once (the first time any task asks); texts are embedded once per unique string
(captions, prompt-template texts, negatives, perturbed captions all go through the same table).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch


class EmbeddingCache:
    """Lazily computed, shared embeddings of `data` under `encoder` (all float32, L2-normalised, CPU)."""

    def __init__(self, encoder: Any, data: Any, batch_size: int = 256) -> None:
        self.encoder = encoder
        self.data = data
        self.batch_size = int(batch_size)
        self._text_rows: dict[str, int] = {}
        self._text_embs: list[torch.Tensor] = []
        self.n_image_passes = 0  # how many times the image set went through the encoder (should be 1)
        self.n_texts_encoded = 0  # unique strings sent to the text encoder

        # flattened captions: every caption instance is one text (a query for t2i, gallery item for i2t)
        caps: list[str] = []
        owner: list[int] = []
        for i, cs in enumerate(data.captions):
            for c in [cs] if isinstance(cs, str) else cs:
                caps.append(str(c))
                owner.append(i)
        self.captions: list[str] = caps
        self.caption_image = torch.tensor(owner, dtype=torch.long)  # caption index → image index
        self.n_images = len(data.images)
        self.n_texts = len(caps)

    # -- images ---------------------------------------------------------------------------------
    @cached_property
    def images(self) -> torch.Tensor:
        """N×D image embeddings."""
        self.n_image_passes += 1
        return self.encoder.encode_images(self.data.images, batch_size=self.batch_size).float()

    # -- texts ----------------------------------------------------------------------------------
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """len(texts)×D embeddings; each distinct string is embedded at most once per cache."""
        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_rows))
        if missing:
            embs = self.encoder.encode_texts(missing, batch_size=self.batch_size).float()
            start = sum(len(e) for e in self._text_embs)
            for j, t in enumerate(missing):
                self._text_rows[t] = start + j
            self._text_embs.append(embs)
            self.n_texts_encoded += len(missing)
            self._table = torch.cat(self._text_embs)
            self._text_embs = [self._table]
        if not texts:
            return torch.empty(0, self.dim)
        return self._table[torch.tensor([self._text_rows[t] for t in texts], dtype=torch.long)]

    @cached_property
    def caption_embs(self) -> torch.Tensor:
        """T×D embeddings of the flattened captions (duplicates share one encoder pass)."""
        return self.texts(self.captions)

    @cached_property
    def unique_captions(self) -> list[str]:
        return list(dict.fromkeys(self.captions))

    @cached_property
    def scores_t2i(self) -> torch.Tensor:
        """T×N cosine similarities, caption queries × image gallery (i2t uses the transpose)."""
        return self.caption_embs @ self.images.T

    @property
    def dim(self) -> int:
        return int(getattr(self.encoder, "dim", 0) or (self.images.shape[1]))
