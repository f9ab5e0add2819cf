"""Hash heads: small per-modality networks that map a (frozen) model's L2-normalised embeddings to ±1 codes.

`kind="linear"` — DCMH's hash layer (Jiang & Li, CVPR 2017): one fully connected layer per modality,

    F = tanh(W x + b)  (b × bits, relaxed codes in training),   codes = sign(W x + b)  at inference.

`kind="recurrent"` — BEBR's recurrent binarization (Gan et al. 2023, "Binary Embedding-based
Retrieval at Tencent", arXiv 2302.08714). Per modality and per step u = 1…U (`steps`), an encoder φ_u
(residual MLP) gives `bits` logits that are binarized, a decoder ψ_u (residual MLP) maps the binary vector
back to the float space, and each further step binarizes what the previous ones left unexplained:

    r_1 = x,     x̂_0 = 0
    b_u = sign(φ_u(r_u))                      ∈ {−1, +1}^bits  (straight-through estimator in training)
    x̂_u = x̂_{u−1} + ψ_u(b_u)                  the reconstruction after u steps
    r_{u+1} = x − x̂_u                          the residual the next step binarizes
    code = [b_1, b_2, …, b_U]                  U·bits bits; its first u·bits are the u-step code

So one trained model gives 1×, 2×, … U× `bits` codes, and a prefix of a code is the shorter code.

Where the paper's text was not available to us: we could read its abstract, introduction and third-party
summaries (the module is "binarization, reconstruction and residual blocks", lightweight "residual MLP
blocks", the binarization "repeated" for customised bits), but not the method section's equations. The
recurrence above follows that description; these details are our choices:
- φ_u = Linear(dim→h) → ResBlock(h) → Linear(h→bits); ψ_u = Linear(bits→h) → ResBlock(h) → Linear(h→dim),
  with ResBlock(v) = v + Linear(GELU(Linear(LayerNorm(v)))) (pre-norm, width h) and h = `hidden`, or
  `dim` when `hidden` is 0. LayerNorm, not BatchNorm, so that every row is coded on its own (codes do not
  depend on the batch, and data-parallel losses stay exact).
- Each step has its own encoder and decoder (no weight sharing between steps). By default one recurrent
  network codes both modalities (`shared`): the embeddings already share one space, and the
  embedding-to-embedding training has no cross-modal term, so separate image and text networks would
  code the two modalities in unrelated bit spaces and cross-modal Hamming distances would mean nothing.
  Linear (DCMH) heads are per modality by default: their pairwise loss aligns the two codes.
- The reconstructions are not scaled by a fixed factor (such as 2^{1−u}): each decoder ψ_u learns the
  magnitude of the residual it restores.
- The straight-through estimator is the clipped one of binarized networks (Hubara et al. 2016): the
  gradient of sign passes unchanged where |logit| ≤ 1 and is 0 elsewhere. (The plain identity estimator
  diverged on toy problems: the logits grow without bound and the residual feedback amplifies them.)
- The last layer of every decoder starts at zero, so x̂_u = 0 at initialisation and a step only adds to
  the reconstruction what it has learned (random decoders start far off: squared error ≈ 8 for unit x).
- sign(0) = +1 everywhere, so codes are exactly ±1.

`pack` lays codes out as faiss's binary indexes (`IndexBinaryFlat`) expect: bit k of a row is bit k % 8
(little-endian) of byte k // 8, as `xmodal.index.binary.BinaryCoder.encode` writes them; the Hamming
distance between two packed ±1 codes a, b of c bits is then (c − ⟨a, b⟩) / 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from xmodal.errors import UserError

KINDS = ("linear", "recurrent")
MODALITIES = ("image", "text")


def sign(z: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1 (torch.sign gives 0 there)."""
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


class _SignSTE(torch.autograd.Function):
    """Forward: exactly ±1. Backward: the clipped straight-through estimator, grad · 1[|z| ≤ 1]."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return sign(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * (z.abs() <= 1).to(grad.dtype)


def sign_ste(z: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(z)


class ResBlock(nn.Module):
    """v + W₂ GELU(W₁ LayerNorm(v)): the residual MLP block of BEBR's encoders and decoders."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.fc2(nn.functional.gelu(self.fc1(self.norm(v))))


def _mlp(n_in: int, width: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, width), ResBlock(width), nn.Linear(width, n_out))


class _Step(nn.Module):
    """One recurrent binarization step: encoder φ (float → bits logits) and decoder ψ (bits → float)."""

    def __init__(self, dim: int, bits: int, width: int) -> None:
        super().__init__()
        self.encoder = _mlp(dim, width, bits)
        self.decoder = _mlp(bits, width, dim)
        nn.init.zeros_(self.decoder[-1].weight)  # x̂ starts at 0: a step adds nothing until it has learned
        nn.init.zeros_(self.decoder[-1].bias)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0 or bits % 8:
        raise UserError(f"--bits {bits}: must be a positive multiple of 8 (codes are stored as bytes)")


class HashHeads(nn.Module):
    """Per-modality hash heads on `dim`-wide embeddings; see the module docstring for the two kinds."""

    def __init__(
        self,
        dim: int,
        bits: int,
        kind: str = "linear",
        steps: int = 1,
        hidden: int = 0,
        shared: bool | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if kind not in KINDS:
            raise UserError(f"--kind {kind}: hash heads are one of {', '.join(KINDS)}")
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"--steps {steps}: give a whole number of recurrent binarization steps ≥ 1")
        if kind == "linear" and steps != 1:
            raise UserError(f"--steps {steps}: linear hash heads have one step; use --kind recurrent")
        if dim <= 0 or hidden < 0:
            raise ValueError(f"HashHeads: dim={dim}, hidden={hidden}")
        self.dim, self.bits, self.kind, self.steps, self.hidden = dim, bits, kind, steps, hidden
        self.shared = kind == "recurrent" if shared is None else bool(shared)
        width = hidden or dim

        def head() -> nn.Module:
            if kind == "linear":
                return nn.Linear(dim, bits)
            return nn.ModuleList(_Step(dim, bits, width) for _ in range(steps))

        self.heads = nn.ModuleDict({m: head() for m in (("shared",) if self.shared else MODALITIES)})

    def head(self, modality: str) -> nn.Module:
        """The network that codes `modality` (the one shared network when `shared`)."""
        return self.heads["shared" if self.shared else modality]

    @property
    def total_bits(self) -> int:
        return self.bits * self.steps

    def _input(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected b×{self.dim} embeddings, got shape {tuple(x.shape)}")
        return x.to(next(self.parameters()).dtype)

    def _run(self, x: torch.Tensor, modality: str, steps: int, binarize) -> tuple[list, list]:
        """The recurrence: (codes b_u, reconstructions x̂_u) for u = 1…steps."""
        codes, recons = [], []
        recon = torch.zeros_like(x)
        for step in self.head(modality)[:steps]:
            b = binarize(step.encoder(x - recon))
            recon = recon + step.decoder(b)
            codes.append(b)
            recons.append(recon)
        return codes, recons

    def relaxed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """b × total_bits, differentiable: tanh outputs (linear) or straight-through ±1 codes (recurrent)."""
        x = self._input(x, modality)
        if self.kind == "linear":
            return torch.tanh(self.head(modality)(x))
        return torch.cat(self._run(x, modality, self.steps, sign_ste)[0], dim=1)

    def reconstruct(self, x: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """Recurrent heads: the reconstruction x̂_u (b × dim) after each step u = 1…steps, differentiable."""
        if self.kind != "recurrent":
            raise ValueError("reconstruct needs recurrent hash heads (kind='recurrent')")
        return self._run(self._input(x, modality), modality, self.steps, sign_ste)[1]

    @torch.no_grad()
    def codes(self, x: torch.Tensor, modality: str, steps: int | None = None) -> torch.Tensor:
        """±1 codes (float, no gradient), b × (steps·bits); fewer `steps` give the prefix of the full code."""
        steps = self.steps if steps is None else steps
        if not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be in 1…{self.steps}, not {steps}")
        x = self._input(x, modality)
        if self.kind == "linear":
            return sign(self.head(modality)(x))
        return torch.cat(self._run(x, modality, steps, sign)[0], dim=1)

    @staticmethod
    def pack(codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """±1 codes (N × c, c a multiple of 8) → uint8 N × c/8, little-endian within each byte (faiss)."""
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] % 8:
            raise ValueError(f"pack needs N×c codes with c a multiple of 8, got shape {codes.shape}")
        return np.packbits(codes > 0, axis=1, bitorder="little")

    def config(self) -> dict[str, Any]:
        """What `from_config` needs to rebuild the heads (the weights are in `state_dict`)."""
        return {
            "dim": self.dim,
            "bits": self.bits,
            "kind": self.kind,
            "steps": self.steps,
            "hidden": self.hidden,
            "shared": self.shared,
        }

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> HashHeads:
        keys = {"dim", "bits", "kind", "steps", "hidden", "shared"}
        if not set(d) <= keys or not {"dim", "bits"} <= set(d):
            raise ValueError(f"hash head config {d!r}: expected keys {sorted(keys)}")
        return cls(**{"shared": False, **d})  # (configs written before `shared` had per-modality heads)
