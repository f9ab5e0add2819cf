"""Mixed precision: the autocast dtype for a device, and the loss scaler that float16 needs."""

from __future__ import annotations

import torch

from xmodal.errors import UserError


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. Never float16 on a CPU (emulated there: ~17× slower)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("--precision fp16 is for CUDA only; on a CPU use bf16 (or auto)")
        return torch.float16
    bf16_ok = (  # native only: emulated bf16 (a V100, a CPU without AVX-512 BF16/AMX) is slower than fp32
        torch.cuda.is_bf16_supported(including_emulation=False)
        if device.type == "cuda"
        else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
    if precision == "bf16":
        if not bf16_ok:
            raise UserError(f"--precision bf16: this {device.type} has no bf16 support; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else None  # auto


def make_grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """float16's narrow range underflows small gradients: scale the loss (and unscale before clipping and
    the step, skipping steps whose gradients overflowed). bf16 and fp32 need no scaler."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)
