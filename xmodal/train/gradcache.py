"""GradCache (Gao et al., 2021): a batch too large for memory, trained with its full set of negatives.

Every micro-batch runs forward once without gradients to cache its features; the loss over the whole
batch gives the gradient of each cached feature; each micro-batch then runs forward again, with
gradients, and back-propagates that feature gradient. The second forward must draw the same dropout,
patch-dropout and drop-path masks as the first, or the gradient is not the one of the computed loss:
`RandContext` records the RNG state before each first forward and replays it for the second, as the
GradCache authors' own `RandContext` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

Features = tuple[torch.Tensor, ...]  # (image features, text features, …)


class RandContext:
    """The CPU and CUDA RNG states at creation; `with ctx:` runs its block from those states and leaves
    the global RNG as it was before the block."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
        del self._fork


def cached_feature_backward(
    forward: Callable[[int], Features],
    inputs: Sequence[Sequence[torch.Tensor]],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of `loss_of(all image features, all text
    features)` over the micro-batches `forward(0..k-1)`; returns the (unscaled) loss. `loss_of` takes the
    temperature (and bias) from the model itself, so that they get their gradient too.

    `inputs[i]` are micro-batch i's device tensors (they say which CUDA devices' RNG states to keep);
    `scale_loss` is applied to the loss before backward (a float16 GradScaler's `scale`); every
    micro-batch but the last re-runs under `no_sync()` (DDP's: gradients all-reduced once, in the last)."""
    states, feats = [], []
    with torch.no_grad():
        for i in range(len(inputs)):
            states.append(RandContext(*inputs[i]))
            feats.append(forward(i))
    img_all = torch.cat([f[0] for f in feats]).requires_grad_()
    txt_all = torch.cat([f[1] for f in feats]).requires_grad_()
    loss = loss_of(img_all, txt_all)
    scale_loss(loss).backward()
    sizes = [len(f[0]) for f in feats]
    g_img, g_txt = img_all.grad.split(sizes), txt_all.grad.split(sizes)
    for i, state in enumerate(states):
        with no_sync() if i < len(states) - 1 else contextlib.nullcontext():
            with state:
                img, txt = forward(i)[:2]
            torch.autograd.backward([img, txt], [g_img[i], g_txt[i]])
    return loss
