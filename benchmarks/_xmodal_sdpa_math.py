"""What-if runner: the `xmodal` CLI with PyTorch's math attention kernel instead of the default fused one.

    python benchmarks/_xmodal_sdpa_math.py train --data ... --out ...

`torch.nn.attention.sdpa_kernel([SDPBackend.MATH])` sets process-wide flags, so every
`scaled_dot_product_attention` call of the run (forward; the backward follows the forward's choice) uses
the math path. Nothing else changes; benchmarks/train_vs_open_clip.py --what-if-math runs it beside the
unchanged trainer to measure what that one change would give.
"""

from __future__ import annotations

import sys

from torch.nn.attention import SDPBackend, sdpa_kernel

from xmodal.cli import main

if __name__ == "__main__":
    sys.argv[0] = "xmodal"
    with sdpa_kernel([SDPBackend.MATH]):
        main()
