"""Momentum contrast with feature queues and momentum distillation (ALBEF's ITC), registered as `momentum`.

The trainer keeps an EMA copy of the towers, θ_m ← m·θ_m + (1 − m)·θ after every optimiser step (m =
`momentum`), and hands its features of the same batch to this objective. The keys are the momentum
features of the global batch followed by a queue of the momentum features of earlier steps; the queries are
the model's own features. With temperature τ (the model's learned logit scale 1/τ):

    s_i2t = x_i · [y_m ; Q_y]ᵀ / τ,            s_i2t_m = x_m,i · [y_m ; Q_y]ᵀ / τ
    target_i = α · softmax(s_i2t_m) + (1 − α) · onehot(i)
    L = ½ (−Σ_j target_i,j log softmax(s_i2t)_j  +  the same text→image), averaged over rows,

as `ALBEF.forward` computes `loss_ita` (α ramps up over the first steps as ALBEF's first epoch does when
`warmup` > 0; α = 0 gives MoCo-style ITC with queues and hard targets). After the step the global batch's
momentum features are enqueued, oldest out.

Deviations from the authors' code, and why:
- The keys span the *global* batch (all ranks' momentum features), so the loss is that of one process on
  the whole batch, exact under data parallelism; ALBEF scores each GPU's rows against its local batch only.
- The queue starts empty and only filled entries are keys; ALBEF starts from random unit vectors, which
  act as uninformative negatives until they are pushed out.
- The momentum model runs in eval mode (no dropout), so the soft targets do not depend on dropout draws.

The queues and their pointer are saved in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register


@dataclass
class MomentumParams:
    momentum: float = 0.995  # EMA decay of the momentum towers
    queue: int = 4096  # momentum features of earlier steps kept as extra keys (0 = in-batch only)
    alpha: float = 0.4  # weight of the momentum model's soft targets (ALBEF's α; 0 = one-hot targets)
    warmup: int = 0  # steps over which α ramps linearly from 0 (ALBEF: the first epoch)


@register
class Momentum(Objective):
    name = "momentum"
    description = "ITC against an EMA model's features and a feature queue, with momentum-distilled targets"
    paper = "Li et al. 2021, Align before Fuse (ALBEF): momentum distillation; He et al. 2020, MoCo: queues"
    Params = MomentumParams
    needs = frozenset({"pooled", "momentum"})

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        p = self.params
        if not 0.0 <= p.momentum < 1.0:
            raise UserError(f"--objective momentum(momentum={p.momentum}): give a decay in [0, 1)")
        if p.queue < 0 or p.warmup < 0:
            raise UserError("--objective momentum: queue and warmup must be ≥ 0")
        if not 0.0 <= p.alpha <= 1.0:
            raise UserError(f"--objective momentum(alpha={p.alpha}): give a weight in [0, 1]")
        self.queue_image: torch.Tensor | None = None  # Q×D ring buffers of momentum features
        self.queue_text: torch.Tensor | None = None
        self.ptr = 0  # next row to overwrite
        self.filled = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ema_decay(self) -> float:
        return self.params.momentum

    def alpha_at(self, step: int) -> float:
        w = self.params.warmup
        return self.params.alpha * (min(1.0, step / w) if w else 1.0)

    def _keys(self, mine: torch.Tensor, queued: torch.Tensor | None) -> torch.Tensor:
        if queued is None or self.filled == 0:
            return mine
        return torch.cat([mine, queued[: self.filled]])

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        if f.momentum_image is None:
            raise ValueError("momentum needs the momentum model's features (the trainer provides them)")
        if self.queue_image is not None and self.queue_image.device != f.image.device:  # after a resume
            self.queue_image = self.queue_image.to(f.image.device)
            self.queue_text = self.queue_text.to(f.image.device)
        img_keys = self._keys(f.all_momentum_image, self.queue_image)
        txt_keys = self._keys(f.all_momentum_text, self.queue_text)
        b = len(f.image)
        target = torch.zeros(b, len(img_keys), device=f.image.device, dtype=f.image.dtype)
        target[torch.arange(b), torch.arange(b) + f.offset] = 1.0
        alpha, scale = self.alpha_at(f.step), f.logit_scale.detach()
        total = 0.0
        for q, q_m, keys in ((f.image, f.momentum_image, txt_keys), (f.text, f.momentum_text, img_keys)):
            t = target
            if alpha > 0:
                with torch.no_grad():
                    t = alpha * F.softmax(scale * q_m @ keys.T, 1) + (1 - alpha) * target
            total = total + -(t * F.log_softmax(f.logit_scale * q @ keys.T, 1)).sum(1).mean()
        self._pending = (f.all_momentum_image, f.all_momentum_text)
        return {"momentum": total / 2}

    def commit(self) -> None:
        """Enqueue the step's global-batch momentum features (identical on every rank)."""
        if self._pending is None or self.params.queue == 0:
            self._pending = None
            return
        img, txt = self._pending
        self._pending = None
        n, q = len(img), self.params.queue
        if self.queue_image is None:
            self.queue_image = img.new_zeros(q, img.shape[1])
            self.queue_text = txt.new_zeros(q, txt.shape[1])
        rows = (self.ptr + torch.arange(min(n, q), device=img.device)) % q
        self.queue_image[rows] = img[-len(rows) :]
        self.queue_text[rows] = txt[-len(rows) :]
        self.ptr = int((self.ptr + len(rows)) % q)
        self.filled = min(q, self.filled + len(rows))

    def state_dict(self) -> dict[str, Any]:
        if self.queue_image is None:
            return {}
        return {
            "queue_image": self.queue_image,
            "queue_text": self.queue_text,
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if len(state["queue_image"]) != self.params.queue:
            raise UserError(
                f"--resume: the checkpoint's momentum queue holds {len(state['queue_image'])} rows, "
                f"--objective momentum(queue={self.params.queue}); keep the run's queue size"
            )
        self.queue_image, self.queue_text = state["queue_image"], state["queue_text"]
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
