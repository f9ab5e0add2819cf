"""FSDP (PyTorch's fully_shard): parameters, gradients and optimizer state sharded across ranks, for
models too large to replicate on every GPU. Tested on CPU with gloo against a single process.

FSDP gathers a module's parameters around its `forward`, so both towers run inside one wrapper
module whose forward also returns the temperature (and SigLIP bias) for the loss — and, for a CoCa
model trained with `caption`, the decoder's outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from xmodal.models.text import encode_text

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_PREFIX = "clip."


class DualTower(torch.nn.Module):
    """Both towers behind one forward: normalised image and text features, temperature, bias."""

    def __init__(self, clip: torch.nn.Module, trim_text: bool = True, caption_opts=None) -> None:
        super().__init__()
        self.clip = clip
        self.trim_text = trim_text
        self.caption_opts = caption_opts  # (r_l, r_h): run CoCa's decoder too (`caption_forward`)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        c = self.clip
        if self.caption_opts is not None:
            from xmodal.models.captioner import caption_forward

            img, txt, out = caption_forward(c, pixels, tokens, *self.caption_opts)
            return img, txt, c.logit_scale.exp(), c.logit_bias, out
        img = c.encode_image(pixels, normalize=True)
        txt = (
            encode_text(c, tokens, normalize=True)
            if self.trim_text
            else c.encode_text(tokens, normalize=True)
        )
        return img, txt, c.logit_scale.exp(), c.logit_bias


def shard(
    model: torch.nn.Module,
    device: torch.device,
    world_size: int,
    trim_text: bool = True,
    caption_opts: tuple[float, float | None] | None = None,
) -> DualTower:
    """Shard every transformer block (CoCa's decoder layers too), then the rest, over all ranks."""
    mesh = init_device_mesh(device.type, (world_size,))
    towers = DualTower(model, trim_text, caption_opts)
    blocks: list[torch.nn.Module] = []
    for owner in (getattr(model, "visual", None), model, getattr(model, "text", None)):
        tr = getattr(owner, "transformer", None)
        blocks.extend(getattr(tr, "resblocks", []))
    decoder = getattr(model, "text_decoder", None)  # CoCa's multimodal decoder
    if decoder is not None:
        blocks.extend([*decoder.resblocks, *decoder.cross_attn])
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(towers, mesh=mesh)
    return towers


def full_model_state(towers: DualTower) -> dict[str, torch.Tensor]:
    """Collective: the plain (unsharded) model state dict on rank 0 (empty elsewhere)."""
    sd = get_model_state_dict(towers, options=_FULL)
    return {k[len(_PREFIX) :]: v for k, v in sd.items()}


def full_optimizer_state(towers: DualTower, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: the full optimizer state keyed by parameter name, on rank 0."""
    return get_optimizer_state_dict(towers, optimizer, options=_FULL)


def load_optimizer_state(towers: DualTower, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank passes the full state; each keeps its own shard."""
    set_optimizer_state_dict(towers, optimizer, state, options=StateDictOptions(full_state_dict=True))
