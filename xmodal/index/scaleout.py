"""torchrun scale-out for `index build`: the ranks split the chunks, meet at a barrier, rank 0 assembles.

The process group (gloo, as the trainer uses on CPU; a barrier needs no GPU) is used for nothing but the
two barriers: every rank derives the same chunk plan from the same collection, and the chunks travel
through the shared work folder, so a killed rank loses only the chunk it was computing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from xmodal.errors import UserError

# Ranks wait at the second barrier for the slowest rank's share, which can take hours on a big collection;
# gloo's 30-minute default would fail a healthy build. A dead rank is noticed by torchrun, not by this.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class Ranks:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def tag(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` with a "[rank r/w] " prefix under torchrun (every rank reports its own chunks)."""
        if not self.enabled:
            return log
        return lambda m: log(f"[rank {self.rank}/{self.world}] {m}")

    @contextlib.contextmanager
    def joined(self) -> Iterator[Ranks]:
        """Join the process group (unless the caller already did) for the barriers; leave it cleanly."""
        if not self.enabled:
            yield self
            return
        import torch.distributed as dist

        own = not dist.is_initialized()
        if own:
            try:
                dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            except (ValueError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(
                    f"WORLD_SIZE={self.world}: cannot join the process group ({first}); launch with torchrun"
                ) from e
        try:
            yield self
        finally:
            if own and dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> bool:
        """Wait for every rank; False when the group broke (a rank died) instead of raising."""
        if not self.enabled:
            return True
        import torch.distributed as dist

        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - gloo raises several types when a peer's connection drops
            return False
        return True


def current() -> Ranks:
    """The rank and world size torchrun set in the environment; rank 0 of 1 when it did not."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0") or 0), world)


def rank_device(device: str | None) -> str | None:
    """Under torchrun with GPUs each rank embeds on its own GPU (cuda:LOCAL_RANK) unless told otherwise."""
    if not current().enabled or device not in (None, "auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
