"""The training loop: deterministic batches from the preprocessed cache, contrastive objectives
exact under data parallelism, cached-feature gradient accumulation, atomic checkpoints and resume
that reproduces the uninterrupted loss curve."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xmodal.data import ImageTextData, load_dataset
from xmodal.data.augment import AugmentConfig, augment_images, drop_words
from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic
from xmodal.models import Encoder, ModelSpec, build_model, build_tokenizer, resolve_model_config
from xmodal.models.encoder import pick_device
from xmodal.models.text import encode_text
from xmodal.objectives import contrastive_loss
from xmodal.train import distributed as D
from xmodal.train.checkpoint import load_checkpoint, save_checkpoint
from xmodal.train.config import TrainConfig, save_config

# Crash tests need a run slow enough to kill mid-way; nothing else should set this.
_STEP_DELAY = float(os.environ.get("XMODAL_TEST_STEP_DELAY", "0"))
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Batcher:
    """Batches whose content depends only on (seed, step, rank): the same data order after a resume,
    and each rank takes its slice of the same global batch."""

    def __init__(self, data: ImageTextData, tokenizer: Any, cfg: TrainConfig, dist: D.DistInfo) -> None:
        self.data, self.tokenizer, self.cfg, self.dist = data, tokenizer, cfg, dist
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
        self.steps_per_epoch = self.n // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"--data {cfg.data}: {self.n} usable samples, fewer than --batch-size {cfg.batch_size}"
            )
        self.flat_captions = [c for caps in data.captions for c in caps]
        counts = torch.tensor([len(c) for c in data.captions])
        self.cap_count = counts
        self.cap_start = torch.cumsum(counts, 0) - counts
        self.tokens = None if cfg.aug_word_drop > 0 else self._tokenize(self.flat_captions)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        chunks = [self.tokenizer(texts[i : i + 8192]) for i in range(0, len(texts), 8192)]
        return torch.cat(chunks)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images b×3×S×S, tokens b×L) for this rank at `step`. Every random choice is made for
        the whole global batch (or per global position), so ranks see exactly their slice of it."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, epoch))
            )
            self._perm_epoch = epoch
        idx = self._perm[j * self.global_batch : (j + 1) * self.global_batch]
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, step, 7))
        choice = (torch.rand(len(idx), generator=gen) * self.cap_count[idx]).long()
        start = self.dist.rank * self.local_batch
        rows = slice(start, start + self.local_batch)
        local, cap_idx = idx[rows], (self.cap_start[idx] + choice)[rows]
        if self.tokens is not None:
            tokens = self.tokens[cap_idx]
        else:
            texts = [
                drop_words(
                    self.flat_captions[c],
                    self.cfg.aug_word_drop,
                    torch.Generator().manual_seed(_seed(self.cfg.seed, step, start + i, 13)),
                )
                for i, c in enumerate(cap_idx.tolist())
            ]
            tokens = self.tokenizer(texts)
        return self.data.images[local], tokens


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. Never float16 on a CPU (emulated there: ~17× slower)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("--precision fp16 is for CUDA only; on a CPU use bf16 (or auto)")
        return torch.float16
    bf16_ok = (
        torch.cuda.is_bf16_supported()
        if device.type == "cuda"
        else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
    if precision == "bf16":
        if not bf16_ok:
            raise UserError(f"--precision bf16: this {device.type} has no bf16 support; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else None  # auto


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings-as-vectors and the temperature (as in CLIP)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if excluded else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard events in the run directory."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= resume_step
            ]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self.fh = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        step = record.get("step", 0)
        for k, v in _flatten(record).items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.fh.close()
        self.tb.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dist = D.init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = self.ckpt_dir / "latest.pt"
        if latest.exists() and not resume:
            raise UserError(f"--out {cfg.out}: run already has checkpoints; add --resume or pick a new --out")
        self.resume_state = load_checkpoint(latest) if resume and latest.exists() else None

        torch.manual_seed(cfg.seed)
        self.spec = ModelSpec(
            name=cfg.model,
            pretrained=cfg.pretrained,
            hf_text=cfg.hf_text,
            lock_image=cfg.lock_image,
            lock_text=cfg.lock_text,
        )
        self.model_cfg = resolve_model_config(self.spec)
        self.fsdp = cfg.fsdp
        if self.fsdp:
            if not self.dist.enabled:
                raise UserError("--fsdp shards across processes: launch with torchrun --nproc_per_node N")
            if cfg.accum_steps != 1:
                raise UserError("--fsdp works with --accum-steps 1; use plain data parallelism for GradCache")
            if cfg.compile:
                raise UserError("--fsdp with --compile is not supported yet; drop one of them")
            self.model_cfg["nonscalar_logit_scale"] = True  # fully_shard cannot shard 0-d parameters
        if cfg.objective == "siglip":
            for k, v in SIGLIP_INIT.items():
                self.model_cfg.setdefault(k, v)
        self.model = build_model(self.spec, self.model_cfg, load_hf_weights=self.resume_state is None)
        self.model.to(self.device)
        if self.resume_state is not None:
            self.model.load_state_dict(self.resume_state["model"])
        D.broadcast_params(self.model)
        self.tokenizer = build_tokenizer(self.model_cfg)
        self.encoder = Encoder(
            self.model, self.tokenizer, self.model_cfg, self.device, name=self.run_dir.name
        )
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.encoder.autocast_dtype = self.autocast_dtype
        self.aug = AugmentConfig(cfg.aug_crop_scale, cfg.aug_flip, cfg.aug_color, cfg.aug_word_drop)
        self.towers = None
        if self.fsdp:
            from xmodal.train import fsdp

            self.towers = fsdp.shard(self.model, self.device, self.dist.world_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if self.resume_state is not None:
            if bool(self.resume_state.get("fsdp")) != self.fsdp:
                raise UserError("--resume: the checkpoint was written with a different --fsdp setting")
            if self.fsdp:
                fsdp.load_optimizer_state(self.towers, self.optimizer, self.resume_state["optimizer"])
            else:
                self.optimizer.load_state_dict(self.resume_state["optimizer"])
        self._eval_copy: Encoder | None = None
        self._features = self._forward_features
        if cfg.compile:
            self._features = torch.compile(self._forward_features)

    # -- data --------------------------------------------------------------------------------
    def _load(self, source: str) -> ImageTextData:
        return load_dataset(
            source,
            self.encoder.image_size,
            cache_dir=self.cfg.cache_dir,
            image_key=self.cfg.image_key,
            caption_key=self.cfg.caption_key,
            label_key=self.cfg.label_key,
            progress=self.dist.is_main,
        )

    # -- one step ----------------------------------------------------------------------------
    def _forward_features(self, x: torch.Tensor, tokens: torch.Tensor):
        """(image features, text features, temperature, bias) for float pixels in [0, 1] and tokens."""
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            if self.device.type == "cpu":
                # On CPUs the fused flash-attention kernel's backward is slow for short sequences: the
                # plain math kernel trains ~1.5× faster here (benchmarks/train_vs_open_clip.py profile).
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            pixels = self.encoder.normalize_pixels(x)
            if self.towers is not None:
                img, txt, scale, bias = self.towers(pixels, tokens)
                return img.float(), txt.float(), scale, bias
            img = self.model.encode_image(pixels, normalize=True)
            # trimming padding is data-dependent, which torch.compile would trace as a graph break
            txt = (
                self.model.encode_text(tokens, normalize=True)
                if self.cfg.compile
                else encode_text(self.model, tokens, normalize=True)
            )
        return img.float(), txt.float(), self.model.logit_scale.exp(), self.model.logit_bias

    def _pixels(self, images: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        """uint8 → float [0,1] on the device, augmented; `offset` = local position in the rank's batch."""
        x = images.to(self.device, non_blocking=True).float().div_(255)
        if self.aug.images_enabled:
            gen = torch.Generator().manual_seed(_seed(self.cfg.seed, step, 11))
            start = self.dist.rank * (self.cfg.batch_size // self.dist.world_size) + offset
            x = augment_images(x, self.aug, gen, offset=start, total=self.cfg.batch_size)
        return x

    def train_step(self, step: int, images: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
        """One optimiser step; returns (loss averaged over ranks, temperature)."""
        tokens = tokens.to(self.device, non_blocking=True)
        k = self.cfg.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        if k == 1:
            img, txt, scale, bias = self._features(self._pixels(images, step, 0), tokens)
            loss = contrastive_loss(self.cfg.objective, img, txt, scale, bias)
            loss.backward()
        else:  # GradCache: features of every micro-batch first, loss over the whole batch, then re-forward
            im_chunks, tok_chunks = images.chunk(k), tokens.chunk(k)
            micro = len(im_chunks[0])
            with torch.no_grad():
                feats = [
                    self._features(self._pixels(im, step, i * micro), tk)
                    for i, (im, tk) in enumerate(zip(im_chunks, tok_chunks, strict=True))
                ]
            img_all = torch.cat([f[0] for f in feats]).requires_grad_()
            txt_all = torch.cat([f[1] for f in feats]).requires_grad_()
            scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
            loss = contrastive_loss(self.cfg.objective, img_all, txt_all, scale, bias)
            loss.backward()
            g_img, g_txt = img_all.grad.chunk(k), txt_all.grad.chunk(k)
            for i, (im, tk) in enumerate(zip(im_chunks, tok_chunks, strict=True)):
                img, txt, _, _ = self._features(self._pixels(im, step, i * micro), tk)
                torch.autograd.backward([img, txt], [g_img[i], g_txt[i]])
        if not self.fsdp:  # FSDP reduce-scatters (and averages) gradients itself
            D.all_reduce_mean_grads(self.params, self.dist.world_size)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return D.mean_over_ranks(loss.item(), self.device), float(scale.detach().float().reshape(-1)[0])

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, main = self.cfg, self.dist.is_main
        data = self._load(cfg.data)
        val = self._load(cfg.val) if cfg.val else None
        batcher = Batcher(data, self.tokenizer, cfg, self.dist)
        total = cfg.steps or max(1, int(cfg.epochs * batcher.steps_per_epoch))
        start = int(self.resume_state["step"]) if self.resume_state else 0
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.spec.to_dict(), self.model_cfg, self.run_dir / "config.yaml")
            log = MetricsLog(self.run_dir, start if self.resume_state else None)
            if start == 0:
                log.write(
                    {
                        "step": 0,
                        "data": {
                            "train": len(data),
                            "skipped": data.stats.as_dict(),
                            "val": len(val) if val else 0,
                        },
                    }
                )
            if data.stats.total():
                print(f"data: {data.stats.summary()}")
        D.barrier()
        progress = _Progress(total, start, enabled=main and cfg.progress)
        pool = ThreadPoolExecutor(1)
        nxt = pool.submit(batcher.get, start) if start < total else None
        t_last, n_since, loss_sum = time.perf_counter(), 0, 0.0
        step = start
        try:
            for step in range(start, total):
                images, tokens = nxt.result()
                nxt = pool.submit(batcher.get, step + 1) if step + 1 < total else None
                lr = lr_at(step, cfg, total)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss, scale = self.train_step(step, images, tokens)
                if not math.isfinite(loss):
                    raise RuntimeError(f"loss became {loss} at step {step + 1}; lower --lr or check the data")
                done = step + 1
                n_since += cfg.batch_size
                loss_sum += loss
                progress.update(done, loss, cfg.batch_size)
                if main and (done % cfg.log_every == 0 or done == total):
                    now = time.perf_counter()
                    log.write(
                        {
                            "step": done,
                            "epoch": batcher.epoch_of(step),
                            "loss": loss,
                            "loss_avg": loss_sum / max(1, n_since // cfg.batch_size),
                            "lr": lr,
                            "logit_scale": scale,
                            "samples_per_s": n_since / (now - t_last),
                        }
                    )
                    t_last, n_since, loss_sum = now, 0, 0.0
                if val is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total):
                    encoder = self._eval_encoder()  # collective under FSDP
                    if main:
                        log.write({"step": done, "val": self.validate(encoder, val)})
                    D.barrier()
                if done % cfg.save_every == 0 or done == total:
                    self.save(done)
                if _STEP_DELAY:
                    time.sleep(_STEP_DELAY)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            progress.close()
        if main:
            log.close()
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        D.barrier()
        return self.run_dir

    def _eval_encoder(self) -> Encoder | None:
        """The encoder to validate with: the live model, or under FSDP an unsharded copy on rank 0."""
        if not self.fsdp:
            return self.encoder
        from xmodal.train import fsdp

        state = fsdp.full_model_state(self.towers)
        if not self.dist.is_main:
            return None
        if self._eval_copy is None:
            copy = build_model(self.spec, self.model_cfg, load_hf_weights=False).to(self.device)
            self._eval_copy = Encoder(
                copy, self.tokenizer, self.model_cfg, self.device, autocast_dtype=self.autocast_dtype
            )
        self._eval_copy.model.load_state_dict(state)
        return self._eval_copy

    def validate(self, encoder: Encoder, val: ImageTextData) -> dict[str, Any]:
        from xmodal.eval import evaluate  # the eval stage's metrics, on the live model

        tasks = ("retrieval", "zeroshot") if any(lab is not None for lab in val.labels) else ("retrieval",)
        result = evaluate(encoder, val, tasks=tasks)
        self.model.train()
        return {k: v for k, v in result.items() if k != "meta"}

    def save(self, step: int) -> None:
        if self.fsdp:  # gathering the shards is collective: every rank takes part
            from xmodal.train import fsdp

            model_state = fsdp.full_model_state(self.towers)
            optim_state = fsdp.full_optimizer_state(self.towers, self.optimizer)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.dist.is_main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "fsdp": self.fsdp,
                "step": step,
                "config": self.cfg.to_dict(),
                "torch": str(torch.__version__),
            }
            save_checkpoint(state, self.ckpt_dir, step, keep=self.cfg.keep_checkpoints)
        D.barrier()


class _Progress:
    """A rich progress bar with loss, samples/s and ETA (rank 0 only)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[sps]} samples/s"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.p.add_task("train", total=total, completed=start, loss="-", sps="-")
        self.t0, self.n0 = time.perf_counter(), 0
        self.p.start()

    def update(self, done: int, loss: float, batch: int) -> None:
        if not self.enabled:
            return
        self.n0 += batch
        sps = self.n0 / max(1e-9, time.perf_counter() - self.t0)
        self.p.update(self.task, completed=done, loss=f"{loss:.4f}", sps=f"{sps:.0f}")

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


def plot_loss_curve(metrics: Path, out: Path) -> None:
    """loss.png from metrics.jsonl (training loss, and validation R@1 where logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    vals = [
        (r["step"], r["val"]["retrieval"]["t2i"]["R@1"])
        for r in rows
        if "val" in r and "retrieval" in r["val"]
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts, strict=True), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals, strict=True), "o-", color="tab:orange", label="val t2i R@1")
        ax2.set_ylabel("R@1")
    ax.set_title(metrics.parent.name)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
