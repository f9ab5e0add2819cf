"""Deterministic batches: their content depends only on (seed, step, rank), so a resumed run sees the
same data order and each rank takes its slice of the same global batch.

Replay (`--replay OLD --replay-fraction f`): R = round(f·B) rows of every global batch of B come from the
old data, at positions spread evenly over the batch (so each rank's slice holds its share, and the layout
does not depend on the number of ranks: 2 processes see exactly the batch of 1). They cycle through the old
set without replacement: a fresh seeded permutation per pass, R rows per step, the pass's remainder left
out (as an epoch drops its last partial batch), so no sample repeats within a batch. An epoch stays one
pass over the main data, now B − R rows per step. Everything is a function of (seed, step), so a resumed
run draws the same replay rows as an uninterrupted one.

Text side (the `improved` recipe's caption handling, Fini et al. 2023): an image with several captions
gets one of them, uniformly at random, each step; with --aug-text-eda / --aug-word-drop each caption is
augmented per (seed, step, global position) and the step's captions are tokenised then."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from xmodal.data import ImageTextData
from xmodal.data.augment import drop_words, eda
from xmodal.errors import UserError
from xmodal.train import distributed as D
from xmodal.train.config import TrainConfig, replay_rows


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def data_fingerprint(data: ImageTextData) -> str:
    """What the data order depends on (sample keys and captions, in order), hashed: a resume on other
    data would silently continue a different run."""
    h = hashlib.sha256()
    for key, caps in zip(data.keys, data.captions, strict=True):
        h.update(json.dumps([key, caps], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def replay_positions(batch: int, rows: int) -> torch.Tensor:
    """bool over the global batch: True at the `rows` positions spread evenly over it (p where
    ⌊(p+1)·rows/batch⌋ > ⌊p·rows/batch⌋), so every contiguous rank slice holds its share ±1."""
    p = torch.arange(batch)
    return (p + 1) * rows // batch > p * rows // batch


class Batcher:
    """Batches whose content depends only on (seed, step, rank): the same data order after a resume,
    and each rank takes its slice of the same global batch. With `replay` (the `--replay` data) sample
    index n + i is replay sample i, in `indices` and `local_rows` as in the caption tables."""

    def __init__(
        self,
        data: ImageTextData,
        tokenizer: Any,
        cfg: TrainConfig,
        dist: D.DistInfo,
        replay: ImageTextData | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.data, self.tokenizer, self.cfg, self.dist = data, tokenizer, cfg, dist
        # CUDA: `get` returns the batch on the device, copied from pinned memory on a side stream
        self._cuda = _CudaCopy(device) if device is not None and device.type == "cuda" else None
        self.replay = replay
        self.n = len(data)
        self.global_batch = cfg.batch_size
        if self.global_batch % dist.world_size:
            raise UserError(
                f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes"
            )
        self.local_batch = self.global_batch // dist.world_size
        if self.local_batch % cfg.accum_steps:
            raise UserError(
                f"--accum-steps {cfg.accum_steps} must divide the per-process batch {self.local_batch}"
            )
        self.replay_rows = replay_rows(cfg) if replay is not None else 0
        self.main_rows = self.global_batch - self.replay_rows  # rows of --data per step
        self.steps_per_epoch = self.n // self.main_rows
        if self.steps_per_epoch == 0:
            raise UserError(
                f"--data {cfg.data}: {self.n} usable samples, fewer than the {self.main_rows} rows of each "
                f"batch (--batch-size {cfg.batch_size})"
            )
        captions, labels = data.captions, data.labels
        if replay is not None:
            if replay.images.shape[1:] != data.images.shape[1:]:
                raise ValueError("--replay: its images were loaded at another size than --data's")
            if len(replay) < self.replay_rows:
                raise UserError(
                    f"--replay {cfg.replay}: {len(replay)} usable samples, fewer than the {self.replay_rows} "
                    f"rows each batch replays; lower --replay-fraction"
                )
            self.replay_steps_per_pass = len(replay) // self.replay_rows
            self.is_replay = replay_positions(self.global_batch, self.replay_rows)
            captions, labels = captions + replay.captions, labels + replay.labels
        self.flat_captions = [c for caps in captions for c in caps]
        counts = torch.tensor([len(c) for c in captions])
        self.cap_count = counts
        self.cap_start = torch.cumsum(counts, 0) - counts
        self.text_augmented = cfg.aug_word_drop > 0 or cfg.aug_text_eda > 0
        self.tokens = None if self.text_augmented else self._tokenize(self.flat_captions)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self._replay_pass, self._replay_perm = -1, torch.empty(0, dtype=torch.long)
        names = sorted({lab for lab in labels if lab is not None})
        index = {lab: i for i, lab in enumerate(names)}
        # class ids for label-aware objectives (multipos, sdm); -1 = unlabelled
        self.label_ids = torch.tensor([index.get(lab, -1) for lab in labels], dtype=torch.long)

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        chunks = [self.tokenizer(texts[i : i + 8192]) for i in range(0, len(texts), 8192)]
        return torch.cat(chunks)

    def augment_text(self, text: str, step: int, position: int) -> str:
        """One caption at global batch position `position` of `step`: EDA, then word dropout, each with its
        own generator seeded by (seed, step, position), so ranks and micro-batches agree."""
        if self.cfg.aug_text_eda > 0:
            g = torch.Generator().manual_seed(stable_seed(self.cfg.seed, step, position, 17))
            text = eda(text, self.cfg.aug_text_eda, g)
        if self.cfg.aug_word_drop > 0:
            g = torch.Generator().manual_seed(stable_seed(self.cfg.seed, step, position, 13))
            text = drop_words(text, self.cfg.aug_word_drop, g)
        return text

    def caption_index(self, step: int) -> torch.Tensor:
        """Index into `flat_captions` of the caption each sample of the global batch at `step` gets: one of
        its image's captions, uniformly at random, seeded by (seed, step)."""
        idx = self.indices(step)
        gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, step, 7))
        choice = (torch.rand(len(idx), generator=gen) * self.cap_count[idx]).long()
        return self.cap_start[idx] + choice

    def indices(self, step: int) -> torch.Tensor:
        """The samples of the global batch at `step` (an epoch's permutation, seeded by (seed, epoch)),
        with the replayed ones (index n + i: replay sample i) at their positions."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(stable_seed(self.cfg.seed, epoch))
            )
            self._perm_epoch = epoch
        main = self._perm[j * self.main_rows : (j + 1) * self.main_rows]
        if not self.replay_rows:
            return main
        out = torch.empty(self.global_batch, dtype=torch.long)
        out[~self.is_replay] = main
        out[self.is_replay] = self.n + self.replay_indices(step)
        return out

    def replay_indices(self, step: int) -> torch.Tensor:
        """The replay samples (indices into the replay data) of the batch at `step`: R consecutive rows of
        the current pass's permutation of the old set, seeded by (seed, pass)."""
        n_pass, j = divmod(step, self.replay_steps_per_pass)
        if n_pass != self._replay_pass:
            gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, n_pass, 23))
            self._replay_perm = torch.randperm(len(self.replay), generator=gen)
            self._replay_pass = n_pass
        return self._replay_perm[j * self.replay_rows : (j + 1) * self.replay_rows]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def replay_pass_of(self, step: int) -> int:
        """How many full passes over the replay data came before `step`."""
        return step // self.replay_steps_per_pass if self.replay_rows else 0

    def local_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample indices, flat caption indices) of this rank's rows at `step`, as `get` takes them."""
        start = self.dist.rank * self.local_batch
        rows = slice(start, start + self.local_batch)
        return self.indices(step)[rows], self.caption_index(step)[rows]

    def texts(self, step: int) -> list[str]:
        """This rank's captions at `step` as `get` tokenises them (augmented with text augmentation on)."""
        start = self.dist.rank * self.local_batch
        _, cap_idx = self.local_rows(step)
        if not self.text_augmented:
            return [self.flat_captions[c] for c in cap_idx.tolist()]
        return [
            self.augment_text(self.flat_captions[c], step, start + i) for i, c in enumerate(cap_idx.tolist())
        ]

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 images b×3×S×S, tokens b×L, label ids b) for this rank at `step`. Every random choice is
        made for the whole global batch (or per global position), so ranks see exactly their slice of it."""
        local, cap_idx = self.local_rows(step)
        tokens = self.tokens[cap_idx] if self.tokens is not None else self.tokenizer(self.texts(step))
        if self._cuda is not None:
            return self._cuda(self._images_pinned(local), tokens, self.label_ids[local])
        return self._images(local), tokens, self.label_ids[local]

    def _images(self, rows: torch.Tensor) -> torch.Tensor:
        if self.replay is None:
            return self.data.images[rows]
        old = rows >= self.n
        out = torch.empty((len(rows), *self.data.images.shape[1:]), dtype=self.data.images.dtype)
        out[~old] = self.data.images[rows[~old]]
        out[old] = self.replay.images[rows[old] - self.n]
        return out

    def _images_pinned(self, rows: torch.Tensor) -> torch.Tensor:
        """`_images(rows)` gathered straight into page-locked memory (one copy, no pinning pass after)."""
        shape = (len(rows), *self.data.images.shape[1:])
        out = torch.empty(shape, dtype=self.data.images.dtype, pin_memory=True)
        if self.replay is None:
            return torch.index_select(self.data.images, 0, rows, out=out)
        old = rows >= self.n
        out[~old] = self.data.images[rows[~old]]
        out[old] = self.replay.images[rows[old] - self.n]
        return out


class _CudaCopy:
    """Host → GPU copy of a batch on a side CUDA stream, from pinned memory, in the thread that calls it
    (`Trainer.fit` runs `Batcher.get` in a background thread), so the copy overlaps the running step.

    The thread waits for the copy to finish before handing the tensors over, so the consumer may use them
    on its own stream without waiting; `record_stream` tells the caching allocator that the consumer
    stream (the current stream of the thread that built the Batcher: the training loop's) uses their
    memory, so it is not reused for a later copy while a step still reads it."""

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)
        self.consumer = torch.cuda.current_stream(self.device)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            host = [t if t.is_pinned() else t.pin_memory() for t in tensors]
            out = tuple(t.to(self.device, non_blocking=True) for t in host)
            done = self.stream.record_event()
        done.synchronize()
        for t in out:
            t.record_stream(self.consumer)
        return out
