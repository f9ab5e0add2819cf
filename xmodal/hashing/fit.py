"""Learned codes for embeddings you already have: fit recurrent (BEBR) hash heads on float vectors with
the registered `bebr` objective, without a model or a training run (`xmodal hash train` is the run-based
path). For `SearchIndex.from_vectors(x, kind="learned-binary", coder=LearnedCoder.from_heads(heads))`."""

from __future__ import annotations

import numpy as np
import torch

from xmodal.hashing.heads import HashHeads


def fit_bebr(
    image: np.ndarray,
    text: np.ndarray | None = None,
    *,
    bits: int = 64,
    code_steps: int = 4,
    hidden: int = 0,
    train_steps: int = 500,
    batch_size: int = 1024,
    lr: float = 1e-3,
    objective: str = "bebr",
    seed: int = 0,
) -> HashHeads:
    """Shared recurrent heads (`code_steps`·`bits` bits) fit by Adam on random batches of the L2-normalised
    rows of `image` and `text` (default: `image` for both sides). Deterministic for a given seed."""
    from xmodal.objectives import Composite
    from xmodal.objectives.registry import Features

    def unit(x: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return torch.nn.functional.normalize(t, dim=1)

    img = unit(image)
    txt = img if text is None else unit(text)
    if txt.shape[1] != img.shape[1]:
        raise ValueError(f"image rows are {img.shape[1]}-d but text rows {txt.shape[1]}-d")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = HashHeads(img.shape[1], bits, "recurrent", steps=code_steps, hidden=hidden, shared=True)
    loss_fn = Composite.from_config(objective)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    b = min(batch_size, len(img), len(txt))
    one = torch.tensor(1.0)
    for _ in range(train_steps):
        xi = img[torch.randint(len(img), (b,), generator=gen)]
        xt = txt[torch.randint(len(txt), (b,), generator=gen)]
        f = Features(xi, xt, xi, xt, 0, one, hash_heads=heads)
        loss = sum(loss_fn.objectives_terms(f).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads.eval()
