"""Backward-compatible upgrades: a small projection from a new model's embedding space into an old one's
(XBT-style: fitted on text first, then on a few image-text pairs), so the new model's queries can search a
gallery the old model embedded, and the compatibility metric M(new, old) against M(old, old).

`Projection`/`load_projection` (numpy only: the index layer applies a projection without torch) live in
`xmodal.compat.projection`; fitting (torch) in `xmodal.compat.fit`; the CLI is `xmodal compat fit`, and the
metric is `xmodal eval --task compat` (`xmodal.eval.compat`).
"""

__all__ = ["KINDS", "Projection", "fit_projection", "load_projection"]


def __getattr__(name: str):
    """Everything loads on first use: the CLI's help imports neither numpy nor torch."""
    if name == "fit_projection":  # imports torch
        from xmodal.compat.fit import fit_projection

        return fit_projection
    if name in ("KINDS", "Projection", "load_projection"):
        from xmodal.compat import projection

        return getattr(projection, name)
    raise AttributeError(f"module 'xmodal.compat' has no attribute {name!r}")
