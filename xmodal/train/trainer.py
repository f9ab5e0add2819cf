"""The trainer: contrastive objectives exact under data parallelism, cached-feature gradient accumulation
(exact with dropout too), atomic checkpoints and a resume that reproduces the uninterrupted loss curve."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from xmodal.data import ImageTextData, load_dataset
from xmodal.data.augment import AugmentConfig, augment_images
from xmodal.data.dataset import AUTO_WORKERS
from xmodal.errors import UserError
from xmodal.models import Encoder, ModelSpec, build_model, build_tokenizer, resolve_model_config
from xmodal.models.attention import use_explicit_attention
from xmodal.models.encoder import pick_device
from xmodal.models.pooled import encode_image
from xmodal.models.text import encode_text
from xmodal.objectives import Composite
from xmodal.train import distributed as D
from xmodal.train.allocator import keep_freed_memory
from xmodal.train.batcher import Batcher, data_fingerprint, stable_seed
from xmodal.train.checkpoint import load_checkpoint, save_checkpoint
from xmodal.train.config import TrainConfig, save_config
from xmodal.train.gradcache import cached_feature_backward
from xmodal.train.logs import MetricsLog, Progress, plot_loss_curve
from xmodal.train.optim import lr_at, make_optimizer
from xmodal.train.precision import make_grad_scaler, resolve_precision

# Crash tests need a run slow enough to kill mid-way; nothing else should set this.
_STEP_DELAY = float(os.environ.get("XMODAL_TEST_STEP_DELAY", "0"))
_FLAT_REDUCE = False  # tests set this to compare DDP's all-reduce with the flat one (`_data_parallel`)
RESUME_MUST_MATCH = ("batch_size", "seed", "replay_fraction")  # and the data itself: `data_fingerprint`


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, resume_override: bool = False) -> None:
        from xmodal.train.profile import Phases

        self.phases = Phases()  # where the command's time goes: RUN/profile.json
        with self.phases("model"):
            self._setup(cfg, resume, resume_override)

    def _setup(self, cfg: TrainConfig, resume: bool, resume_override: bool) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dist = D.init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cuda":  # TF32 matmuls for what stays fp32 (as open_clip's trainer sets)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = self.ckpt_dir / "latest.pt"
        if latest.exists() and not resume:
            raise UserError(f"--out {cfg.out}: run already has checkpoints; add --resume or pick a new --out")
        if resume and not latest.exists():
            raise UserError(f"--resume: {latest} does not exist; drop --resume to start a new run")
        self.resume_state = load_checkpoint(latest) if resume else None
        self.resume_override = resume_override
        self.data_fingerprint: str | None = None  # set by fit() once the data is loaded
        self.replay_fingerprint: str | None = None  # and the --replay data's
        if self.resume_state is not None and not resume_override:
            saved = self.resume_state.get("config", {})
            for name in RESUME_MUST_MATCH:
                if name in saved and saved[name] != getattr(cfg, name):
                    raise UserError(
                        f"--resume: --{name.replace('_', '-')} {getattr(cfg, name)} differs from the run's "
                        f"{saved[name]}, so the data order would change; keep it, or add --resume-override"
                    )

        torch.manual_seed(cfg.seed)
        self.spec = ModelSpec(
            name=cfg.model,
            pretrained=cfg.pretrained,
            hf_text=cfg.hf_text,
            hf_pooler=cfg.hf_pooler,
            lock_image=cfg.lock_image,
            lock_text=cfg.lock_text,
            lock_image_unlocked_groups=cfg.lock_image_unlocked_groups,
            lock_text_unlocked_layers=cfg.lock_text_unlocked_layers,
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
        self.objective = Composite.from_config(cfg.objective)
        self.needs = self.objective.needs
        if "momentum" in self.needs and self.objective.ema_decay is None:
            raise ValueError("an objective needs the momentum model but gives no EMA decay")
        extra = sorted(self.needs & {"tokens", "momentum", "teacher", "fusion"})
        if extra and self.fsdp:
            raise UserError(f"--objective {cfg.objective}: needs {', '.join(extra)}, not with --fsdp yet")
        if "fusion" in self.needs:
            if cfg.compile:
                raise UserError(
                    f"--objective {cfg.objective}: the fusion objectives do not run with --compile yet"
                )
            from xmodal.models.fusion import FUSION_DEFAULTS

            self.model_cfg.setdefault("fusion", dict(FUSION_DEFAULTS))  # a model JSON may size it
        if cfg.tome:  # ToMe (Bolya et al. 2023) without proportional attention, as its authors train it
            self._refuse_token_readers(f"--tome {cfg.tome}")
            self.model_cfg.setdefault("tome", {"r": cfg.tome, "prop_attn": False})
        self.caption_opts = self._caption_opts(cfg) if "caption" in self.needs else None
        if self.caption_opts and self.caption_opts[1]:
            from xmodal.models.captioner import TGMIM_DEFAULTS

            self.model_cfg.setdefault("tgmim", dict(TGMIM_DEFAULTS))
        if cfg.accum_steps > 1 and self.objective.unsupported_with_accumulation():
            names = ", ".join(self.objective.unsupported_with_accumulation())
            raise UserError(f"--objective {names} cannot run on cached features; use --accum-steps 1")
        for k, v in self.objective.model_init.items():  # e.g. SigLIP's initial temperature and bias
            self.model_cfg.setdefault(k, v)
        self.distill_teacher = self._load_teacher(cfg) if cfg.teacher else None
        # a teacher is the initial model, pretrained weights included, so a resumed run rebuilds it too
        self.model = build_model(
            self.spec, self.model_cfg, load_hf_weights=self.resume_state is None or "teacher" in self.needs
        )
        if "caption" in self.needs:
            from xmodal.models.captioner import check_coca

            check_coca(self.model, f"--objective {cfg.objective} with --model {cfg.model}")
        if "tokens" in self.needs:  # a tower without token outputs fails here, not at the first step
            from xmodal.models.tokens import check_tokens_supported

            check_tokens_supported(self.model)
        if cfg.accum_steps > 1 and any(isinstance(m, _BatchNorm) for m in self.model.modules()):
            raise UserError(
                f"--accum-steps {cfg.accum_steps}: --model {cfg.model} has BatchNorm layers, whose "
                "statistics differ per micro-batch, so accumulation cannot be exact; use --accum-steps 1"
            )
        # train mode throughout: Hugging Face towers come out of from_pretrained in eval mode, which left
        # their dropout off until the first validation switched it on
        self.model.to(self.device).train()
        if self.device.type == "cpu":  # same formula, ~1.3× faster steps on CPUs (xmodal/models/attention.py)
            use_explicit_attention(self.model)
            keep_freed_memory()  # no page faults for the buffers every step re-allocates (allocator.py)
        # (resuming too when a frozen teacher is the initial model: it must be the --init-from run's weights,
        # e.g. the previous model of `modx`; the resumed weights replace the live model's just below)
        if cfg.init_from and (
            self.resume_state is None or ("teacher" in self.needs and not self.distill_teacher)
        ):
            self._init_from(cfg.init_from)
        # frozen copies, in eval mode (no dropout: the targets they give are deterministic)
        self.teacher = self._frozen_copy() if "teacher" in self.needs and not self.distill_teacher else None
        self.momentum_model = self._frozen_copy() if "momentum" in self.needs else None
        self.ema_anchor = self.objective.ema_anchor if self.momentum_model is not None else 0.0
        if self.ema_anchor and self.teacher is None:
            raise UserError(
                f"--objective {cfg.objective}: its momentum model is anchored on the frozen previous model "
                "(the initial, --init-from weights), not on a --teacher; drop --teacher or give anchor=0"
            )
        if self.resume_state is not None:
            self.model.load_state_dict(self.resume_state["model"])
            if self.momentum_model is not None:
                saved = self.resume_state.get("momentum_model")
                if saved is None and not resume_override:
                    raise UserError(
                        "--resume: the checkpoint has no momentum model (the run used another --objective); "
                        "keep the run's objective, or add --resume-override to start the EMA from the weights"
                    )
                self.momentum_model.load_state_dict(saved or self.resume_state["model"])
            self.objective.load_state_dict(self.resume_state.get("objectives") or {})
        self.patch_drop = self._patch_dropout(cfg) if cfg.patch_dropout else None
        self._masked_until = math.inf  # fit() sets the first --unmasked-steps step
        D.broadcast_params(self.model)
        self.tokenizer = build_tokenizer(self.model_cfg)
        self.encoder = Encoder(
            self.model, self.tokenizer, self.model_cfg, self.device, name=self.run_dir.name
        )
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        if self.fsdp and self.autocast_dtype == torch.float16:
            raise UserError("--precision fp16 with --fsdp: the loss scaler is not shard-aware; use bf16")
        self.scaler = make_grad_scaler(self.autocast_dtype, self.device)
        self.encoder.autocast_dtype = self.autocast_dtype
        self.aug = AugmentConfig.from_config(cfg)
        self.towers = None
        if self.fsdp:
            from xmodal.train import fsdp

            self.towers = fsdp.shard(
                self.model, self.device, self.dist.world_size, caption_opts=self.caption_opts
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if self.resume_state is not None:
            if bool(self.resume_state.get("fsdp")) != self.fsdp:
                raise UserError("--resume: the checkpoint was written with a different --fsdp setting")
            if self.fsdp:
                fsdp.load_optimizer_state(self.towers, self.optimizer, self.resume_state["optimizer"])
            else:
                self.optimizer.load_state_dict(self.resume_state["optimizer"])
            if self.scaler is not None and self.resume_state.get("scaler"):
                self.scaler.load_state_dict(self.resume_state["scaler"])
        self._eval_copy: Encoder | None = None
        self.ddp = self._data_parallel()
        self._features = self._forward_features
        if cfg.compile:  # the towers only: dynamo cannot trace the autocast inside `_kernels`' ExitStack
            self._model_features = torch.compile(self._model_features)

    # -- data --------------------------------------------------------------------------------
    def _load(self, source: str) -> ImageTextData:
        return load_dataset(
            source,
            self.encoder.image_size,
            cache_dir=self.cfg.cache_dir,
            image_key=self.cfg.image_key,
            caption_key=self.cfg.caption_key,
            label_key=self.cfg.label_key,
            workers=AUTO_WORKERS,  # a cache miss is decoded on every core
            progress=self.dist.is_main,
        )

    def _caption_opts(self, cfg: TrainConfig) -> tuple[float, float | None]:
        """(SyCoCa r_l for the captioning input, r_h for TG-MIM or None) from the objectives' parameters."""
        by_name = {o.name: o for o, _ in self.objective.objectives}
        if "caption" not in by_name and "tgmim" in by_name:
            raise UserError(f"--objective {cfg.objective}: tgmim trains beside caption; add caption")
        drop = by_name["caption"].params.attentive if "caption" in by_name else 0.0
        return drop, (by_name["tgmim"].params.ratio if "tgmim" in by_name else None)

    def _load_teacher(self, cfg: TrainConfig):
        """`--teacher`: the frozen model the distillation objectives learn from (else the teacher need is
        met by a frozen copy of the initial model). A `feature` student whose embedding width differs
        from the teacher's gets a learned projection into the teacher's space (`feature_proj`)."""
        if "teacher" not in self.needs:
            raise UserError(
                f"--teacher {cfg.teacher}: no objective of --objective {cfg.objective} uses a teacher; add "
                "affinity or feature (e.g. clip+affinity)"
            )
        from xmodal.distill.teacher import Teacher, load_teacher

        teacher = Teacher(load_teacher(cfg.teacher, cfg.teacher_pretrained, self.device))
        if teacher.dim != int(self.model_cfg["embed_dim"]) and "feature" in self._objective_names:
            self.model_cfg.setdefault("feature_proj", {"dim": teacher.dim})
        return teacher

    @property
    def _objective_names(self) -> set[str]:
        return {o.name for o, _ in self.objective.objectives}

    def _teacher_cache(self, data: ImageTextData) -> dict[str, Any]:
        """Cache the teacher's features of the training set where no augmentation changes them each step
        (`--teacher-cache auto`), else run it live; `on` refuses to run live, `off` never caches."""
        cfg, teacher = self.cfg, self.distill_teacher
        if cfg.replay:  # the cache holds the --data rows only; replayed rows have no entry there
            if cfg.teacher_cache == "on":
                raise UserError(
                    "--teacher-cache on: the cache covers --data only, and --replay mixes other rows into "
                    "every batch; use --teacher-cache auto (live) or off"
                )
            if self.dist.is_main and cfg.teacher_cache == "auto":
                print("teacher: --replay mixes old data into every batch, so the teacher runs live")
            return {"cache": "off" if cfg.teacher_cache == "off" else "live"}
        live = {"images": self.aug.images_enabled, "captions": self.batcher.text_augmented}
        changed = [side for side, yes in live.items() if yes]
        if cfg.teacher_cache == "on" and changed:
            raise UserError(
                f"--teacher-cache on: augmentation changes the {' and '.join(changed)} every step, so the "
                "teacher's features cannot be cached; use --teacher-cache auto (live), or drop the "
                "augmentation"
            )
        if cfg.teacher_cache == "off":
            return {"cache": "off"}
        if changed and self.dist.is_main:
            print(
                f"teacher: augmentation changes the {' and '.join(changed)} every step, so the teacher runs "
                "live on them (its features of unchanged inputs are cached)"
            )
        from xmodal.data.dataset import default_cache_dir

        info = teacher.build_cache(
            data,
            self._load_at,
            Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
            self.autocast_dtype,
            images=not live["images"],
            texts=not live["captions"],
            is_main=self.dist.is_main,
            barrier=D.barrier,
        )
        return {"cache": "on" if info else "live", **info}

    def _load_at(self, size: int) -> ImageTextData:
        c = self.cfg
        return load_dataset(
            c.data,
            size,
            cache_dir=c.cache_dir,
            image_key=c.image_key,
            caption_key=c.caption_key,
            label_key=c.label_key,
            workers=AUTO_WORKERS,
            progress=self.dist.is_main,
        )

    def _init_from(self, run: str) -> None:
        """`--init-from RUN`: RUN's latest weights. Heads that only one of the two models has (fusion,
        TG-MIM, a feature projection, hash heads) are left as they are; every other weight must fit."""
        ckpt = Path(run) / "checkpoints" / "latest.pt"
        if not ckpt.is_file():
            raise UserError(f"--init-from {run}: no checkpoint at {ckpt}; give a trained xmodal run")
        state = load_checkpoint(ckpt)["model"]
        own = self.model.state_dict()
        from xmodal.models.build import EXTRA_HEADS

        aids = tuple(f"{h}." for h in EXTRA_HEADS)
        state = {k: v for k, v in state.items() if not (k.startswith(aids) and k not in own)}
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:200])
            raise UserError(
                f"--init-from {run}: its weights do not fit --model {self.cfg.model} ({first})"
            ) from e
        bad = [k for k in missing if not k.startswith(aids)] + list(unexpected)
        if bad:
            raise UserError(
                f"--init-from {run}: its weights do not fit --model {self.cfg.model} ({len(bad)} tensors, "
                f"e.g. {bad[0]}); give --model the run's own config"
            )

    def _refuse_token_readers(self, flag: str, also: list[str] = ()) -> None:
        """A flag that changes the image tokens (patch dropout, ToMe) refuses the objectives that read every
        one of them, and `also` (e.g. --compile, which traces the tower once)."""
        clash = sorted(self.needs & {"tokens", "fusion", "caption"}) + list(also)
        if clash:
            raise UserError(
                f"{flag}: not with {', '.join(clash)} yet (they read every image token, or trace "
                "the tower once); drop one of them"
            )

    def _patch_dropout(self, cfg: TrainConfig):
        """FLIP's patch dropout in the live image tower (the frozen copies see every patch)."""
        from xmodal.models.patch_dropout import install_patch_dropout

        self._refuse_token_readers(
            f"--patch-dropout {cfg.patch_dropout}", ["--compile"] if cfg.compile else []
        )
        return install_patch_dropout(self.model, cfg.patch_dropout, cfg.seed, "--patch-dropout")

    def _frozen_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def _data_parallel(self):
        """DDP around the plain feature forward (`_model_features`), whose all-reduce overlaps the backward;
        None where gradients are instead averaged by one flat all-reduce after the backward: one process,
        FSDP (which reduces its own), --compile, and the fusion objectives (they hand the whole model to
        the loss, outside the forward). The temperature, bias and objective heads are averaged by the flat
        all-reduce in every case (`flat_reduced`): the loss uses them outside the forward too."""
        self.flat_reduced = self.params
        if not self.dist.enabled or self.fsdp or self.cfg.compile or "fusion" in self.needs or _FLAT_REDUCE:
            return None
        from xmodal.models.build import EXTRA_HEADS

        named = dict(self.model.named_parameters())
        side = [n for n in named if n in ("logit_scale", "logit_bias") or n.split(".")[0] in EXTRA_HEADS]
        self.flat_reduced = [named[n] for n in side if named[n].requires_grad]
        return D.data_parallel(self.model, self._model_features, side, self.device)

    # -- one step ----------------------------------------------------------------------------
    def _kernels(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast_dtype:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.device.type == "cpu":
            # On CPUs the fused flash-attention kernel's backward is slow for short sequences: the
            # plain math kernel trains ~1.5× faster here (benchmarks/train_vs_open_clip.py profile).
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def _forward_features(self, x: torch.Tensor, tokens: torch.Tensor):
        """(image features, text features, temperature, bias[, token features]) for float pixels in
        [0, 1] and tokens; token features (a dict of Features fields) only when an objective needs them."""
        with self._kernels():
            pixels = self.encoder.normalize_pixels(x)
            if self.towers is not None:
                img, txt, scale, bias, *cap = self.towers(pixels, tokens)
                return (img.float(), txt.float(), scale, bias, *({"caption": c} for c in cap))
            return (self._model_features if self.ddp is None else self.ddp)(pixels, tokens)

    def _model_features(self, pixels: torch.Tensor, tokens: torch.Tensor):
        """`_forward_features` of the replicated model (under `_kernels`, on normalised pixels)."""
        if self.caption_opts is not None:  # CoCa: contrastive features and the decoder in one pass
            from xmodal.models.captioner import caption_forward

            img, txt, out = caption_forward(self.model, pixels, tokens, *self.caption_opts)
            return img, txt, self.model.logit_scale.exp(), self.model.logit_bias, {"caption": out}
        if "fusion" in self.needs:  # one pass per tower gives pooled features and hidden states
            from xmodal.models.fusion import encode_hidden, tokens_from_hidden

            h = encode_hidden(self.model, pixels, tokens)
            toks = tokens_from_hidden(self.model, h) if "tokens" in self.needs else {}
            img, txt = (F.normalize(v.float(), dim=-1) for v in (h.image, h.text))
            return img, txt, self.model.logit_scale.exp(), self.model.logit_bias, {**toks, "hidden": h}
        if "tokens" in self.needs:
            from xmodal.models.tokens import encode_with_tokens

            img, txt, img_tok, txt_tok, mask = encode_with_tokens(self.model, pixels, tokens)
            toks = {"image_tokens": img_tok, "text_tokens": txt_tok, "text_mask": mask}
            return img.float(), txt.float(), self.model.logit_scale.exp(), self.model.logit_bias, toks
        img = encode_image(self.model, pixels, normalize=True)  # the last block for the class token only
        # trimming padding is data-dependent, which torch.compile would trace as a graph break
        txt = (
            self.model.encode_text(tokens, normalize=True)
            if self.cfg.compile
            else encode_text(self.model, tokens, normalize=True)
        )
        return img.float(), txt.float(), self.model.logit_scale.exp(), self.model.logit_bias

    @torch.no_grad()
    def _frozen_features(self, model: torch.nn.Module, x: torch.Tensor, tokens: torch.Tensor):
        """A frozen copy's (image, text) features of the same (augmented) batch, and its hidden states
        when fusion objectives distil from them (else None)."""
        with self._kernels():
            pixels = self.encoder.normalize_pixels(x)
            if "fusion" in self.needs and model is self.momentum_model:
                from xmodal.models.fusion import encode_hidden

                h = encode_hidden(model, pixels, tokens)
                return F.normalize(h.image.float(), dim=-1), F.normalize(h.text.float(), dim=-1), h
            img = encode_image(model, pixels, normalize=True)
            txt = encode_text(model, tokens, normalize=True)
        return img.float(), txt.float(), None

    def _extra(self, step: int, pixels_of, tok_chunks) -> dict[str, Any]:
        """The momentum and teacher features the objectives asked for, micro-batch by micro-batch."""
        extra: dict[str, Any] = {"step": step}
        if self.distill_teacher is not None:
            extra.update(self._distill_features(step, pixels_of, len(tok_chunks), len(tok_chunks[0])))
        for kind, model in (("momentum", self.momentum_model), ("teacher", self.teacher)):
            if model is None:
                continue
            feats = [self._frozen_features(model, pixels_of(i), t) for i, t in enumerate(tok_chunks)]
            extra[f"{kind}_image"] = torch.cat([f[0] for f in feats])
            extra[f"{kind}_text"] = torch.cat([f[1] for f in feats])
            if feats[0][2] is not None:  # fusion objectives: one micro-batch (no accumulation)
                extra[f"{kind}_hidden"] = feats[0][2]
        if hasattr(self.model, "hash_heads"):
            extra["hash_heads"] = self.model.hash_heads
        if self.teacher is not None:
            extra["teacher_logit_scale"] = self.teacher.logit_scale.exp().detach().float().reshape(())
        return extra

    def _distill_features(self, step: int, pixels_of, k: int, micro: int) -> dict[str, Any]:
        """The `--teacher`'s features of this rank's rows, micro-batch by micro-batch (cached or live)."""
        samples, captions = self.batcher.local_rows(step)
        texts: list[str] = []
        feats = []
        with self._kernels():
            for i in range(k):
                rows = slice(i * micro, (i + 1) * micro)

                def texts_of(rows=rows) -> list[str]:
                    if not texts:
                        texts.extend(self.batcher.texts(step))
                    return texts[rows]

                feats.append(
                    self.distill_teacher.features(
                        samples[rows], captions[rows], lambda i=i: pixels_of(i), texts_of
                    )
                )
        out = {
            "teacher_image": torch.cat([f[0] for f in feats]),
            "teacher_text": torch.cat([f[1] for f in feats]),
            "teacher_logit_scale": self.distill_teacher.logit_scale.to(self.device),
        }
        if hasattr(self.model, "feature_proj"):
            out["feature_proj"] = self.model.feature_proj
        return out

    def _fusion_batch(self, step: int, hidden, extra: dict[str, Any]):
        """The step's `FusionBatch`: hidden states, the model's fusion encoder and the seeded draws."""
        from xmodal.objectives.fusion_batch import FusionBatch

        return FusionBatch(
            model=self.model,
            hidden=hidden,
            seed=self.cfg.seed,
            step=step,
            global_batch=self.cfg.batch_size,
            offset=self.dist.rank * len(hidden.text_ids),
            autocast=self._kernels,
            momentum_model=self.momentum_model,
            momentum_hidden=extra.pop("momentum_hidden", None),
        )

    def _pixels(self, images: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        """uint8 → float [0,1] on the device, augmented; `offset` = local position in the rank's batch."""
        x = images.to(self.device, non_blocking=True).float().div_(255)
        start = self.dist.rank * (self.cfg.batch_size // self.dist.world_size) + offset
        if self.aug.images_enabled:
            gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, step, 11))
            x = augment_images(x, self.aug, gen, offset=start, total=self.cfg.batch_size)
        if self.patch_drop is not None:  # the next forward drops these rows' patches (not in the last steps)
            self.patch_drop.at(step, start, self.cfg.batch_size, active=step < self._masked_until)
        return x

    def backward(
        self, step: int, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Accumulate the gradient of the step's loss into .grad (scaled under fp16); returns (loss,
        temperature, the objectives' unweighted terms)."""
        tokens = tokens.to(self.device, non_blocking=True)
        labels = labels.to(self.device) if labels is not None else None
        k = self.cfg.accum_steps
        scale_loss = self.scaler.scale if self.scaler is not None else (lambda loss: loss)
        if k == 1:
            pixels = self._pixels(images, step, 0)
            img, txt, scale, bias, *toks = self._features(pixels, tokens)
            extra = self._extra(step, lambda i: pixels, [tokens])
            toks = toks[0] if toks else {}
            if "hidden" in toks:
                extra["fusion"] = self._fusion_batch(step, toks.pop("hidden"), extra)
            loss, terms = self.objective(img, txt, scale, bias, labels, **extra, **toks)
            scale_loss(loss).backward()
            return loss, scale, terms
        im_chunks, tok_chunks = images.chunk(k), tokens.chunk(k)
        micro = len(im_chunks[0])
        scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
        terms: dict[str, torch.Tensor] = {}

        def pixels_of(i: int) -> torch.Tensor:  # made per forward (seeded): one micro-batch in memory
            return self._pixels(im_chunks[i], step, i * micro)

        extra = self._extra(step, pixels_of, tok_chunks)

        def loss_of(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            total, parts = self.objective(img, txt, scale, bias, labels, **extra)
            terms.update(parts)
            return total

        loss = cached_feature_backward(
            lambda i: self._features(pixels_of(i), tok_chunks[i]),
            [(t,) for t in tok_chunks],
            loss_of,
            scale_loss,
            contextlib.nullcontext if self.ddp is None else self.ddp.no_sync,
        )
        return loss, scale, terms

    def train_step(
        self, step: int, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[float, float, dict[str, float]]:
        """One optimiser step; returns (loss, temperature, each objective term), averaged over ranks."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, scale, terms = self.backward(step, images, tokens, labels)
        if not self.fsdp:  # FSDP reduce-scatters (and averages) gradients itself; DDP did its share
            D.all_reduce_mean_grads(self.flat_reduced, self.dist.world_size)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the scaled one
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
            if self.momentum_model is not None:  # ALBEF/MoCo: θ_m ← m·θ_m + (1 − m)·θ
                m, a = self.objective.ema_decay, self.ema_anchor
                m_params = list(self.momentum_model.parameters())
                if not a:
                    torch._foreach_lerp_(m_params, list(self.model.parameters()), 1.0 - m)
                else:  # CTP's compatible momentum: θ_m ← m·θ_m + (1 − m)(1 − a)·θ + (1 − m)·a·θ_old
                    torch._foreach_mul_(m_params, m)
                    torch._foreach_add_(m_params, list(self.model.parameters()), alpha=(1 - m) * (1 - a))
                    torch._foreach_add_(m_params, list(self.teacher.parameters()), alpha=(1 - m) * a)
                for b_m, b in zip(self.momentum_model.buffers(), self.model.buffers(), strict=True):
                    b_m.copy_(b)
        self.objective.commit()  # e.g. enqueue this step's momentum features
        names = list(terms)
        total, *parts = D.mean_over_ranks([loss.item(), *(terms[n].item() for n in names)], self.device)
        return total, float(scale.detach().float().reshape(-1)[0]), dict(zip(names, parts, strict=True))

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, main, phase = self.cfg, self.dist.is_main, self.phases
        with phase("data"):
            data = self._load(cfg.data)
            val = self._load(cfg.val) if cfg.val else None
        self.data_fingerprint = data_fingerprint(data)
        saved_fp = (self.resume_state or {}).get("data_fingerprint")
        if saved_fp and saved_fp != self.data_fingerprint and not self.resume_override:
            raise UserError(
                f"--resume: --data {cfg.data} is not the data this run was trained on (other samples or "
                "captions); resume with the run's data, or add --resume-override"
            )
        with phase("data"):
            replay = self._load(cfg.replay) if cfg.replay else None  # the same pipeline and cache as --data
        if replay is not None:
            self.replay_fingerprint = data_fingerprint(replay)
            saved_fp = (self.resume_state or {}).get("replay_fingerprint")
            if saved_fp and saved_fp != self.replay_fingerprint and not self.resume_override:
                raise UserError(
                    f"--resume: --replay {cfg.replay} is not the old data this run replayed (other samples "
                    "or captions); resume with the run's --replay data, or add --resume-override"
                )
        with phase("batcher"):
            batcher = self.batcher = Batcher(
                data, self.tokenizer, cfg, self.dist, replay=replay, device=self.device
            )
        with phase("teacher"):
            teacher_info = self._teacher_cache(data) if self.distill_teacher is not None else None
        total = cfg.steps or max(1, int(cfg.epochs * batcher.steps_per_epoch))
        if cfg.unmasked_steps >= total:
            raise UserError(
                f"--unmasked-steps {cfg.unmasked_steps}: the run has {total} steps; tune fewer than that"
            )
        self._masked_until = total - cfg.unmasked_steps  # FLIP: steps from here on see every patch
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
                            **({"replay": self._replay_info(replay)} if replay is not None else {}),
                        },
                        **({"teacher": {"source": cfg.teacher, **teacher_info}} if teacher_info else {}),
                    }
                )
            if data.stats.total():
                print(f"data: {data.stats.summary()}")
        D.barrier()
        progress = Progress(total, start, enabled=main and cfg.progress)
        pool = ThreadPoolExecutor(1)
        nxt = pool.submit(batcher.get, start) if start < total else None
        t_last, n_since, loss_sum = time.perf_counter(), 0, 0.0
        step = start
        loop_start, outside = time.perf_counter(), self._outside_steps()
        try:
            for step in range(start, total):
                images, tokens, labels = nxt.result()
                nxt = pool.submit(batcher.get, step + 1) if step + 1 < total else None
                lr = lr_at(step, cfg, total)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss, scale, terms = self.train_step(step, images, tokens, labels)
                if not math.isfinite(loss):
                    raise RuntimeError(f"loss became {loss} at step {step + 1}; lower --lr or check the data")
                done = step + 1
                n_since += cfg.batch_size
                loss_sum += loss
                progress.update(done, loss, cfg.batch_size, terms)
                if main and (done % cfg.log_every == 0 or done == total):
                    now = time.perf_counter()
                    log.write(
                        {
                            "step": done,
                            "epoch": batcher.epoch_of(step),
                            **({"replay_pass": batcher.replay_pass_of(step)} if replay is not None else {}),
                            "loss": loss,
                            "losses": terms,  # each objective's term, unweighted
                            "loss_avg": loss_sum / max(1, n_since // cfg.batch_size),
                            "lr": lr,
                            "logit_scale": scale,
                            "samples_per_s": n_since / (now - t_last),
                        }
                    )
                    t_last, n_since, loss_sum = now, 0, 0.0
                if val is not None and (done == total or (cfg.eval_every and done % cfg.eval_every == 0)):
                    with phase("validation"):
                        encoder = self._eval_encoder()  # collective under FSDP
                        if main:
                            log.write({"step": done, "val": self.validate(encoder, val)})
                        D.barrier()
                if done % cfg.save_every == 0 or done == total:
                    with phase("checkpoints"):
                        self.save(done)
                if _STEP_DELAY:
                    time.sleep(_STEP_DELAY)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            progress.close()
        phase.seconds["steps"] = time.perf_counter() - loop_start - (self._outside_steps() - outside)
        with phase("finish"):
            if main:
                log.close()
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            D.barrier()
        if main:
            print(phase.write(self.run_dir, total - start, (total - start) * cfg.batch_size))
        return self.run_dir

    def _outside_steps(self) -> float:
        """Seconds spent so far in the loop's validation and checkpoints (taken out of `steps`)."""
        return self.phases.seconds.get("validation", 0.0) + self.phases.seconds.get("checkpoints", 0.0)

    def _replay_info(self, replay: ImageTextData) -> dict[str, Any]:
        """What metrics.jsonl records of `--replay`: the old data, and the rows of each batch it gives."""
        rows = self.batcher.replay_rows
        return {
            "source": self.cfg.replay,
            "samples": len(replay),
            "skipped": replay.stats.as_dict(),
            "rows_per_batch": rows,
            "fraction": rows / self.cfg.batch_size,
            "steps_per_pass": self.batcher.replay_steps_per_pass,
        }

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
                "data_fingerprint": self.data_fingerprint,
                "replay_fingerprint": self.replay_fingerprint,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "momentum_model": (
                    self.momentum_model.state_dict() if self.momentum_model is not None else None
                ),
                "objectives": self.objective.state_dict(),  # e.g. feature queues
                "step": step,
                "config": self.cfg.to_dict(),
                "torch": str(torch.__version__),
            }
            save_checkpoint(state, self.ckpt_dir, step, keep=self.cfg.keep_checkpoints)
        D.barrier()
