"""Hubness folding: the `FoldingMixin` part of `SearchIndex` that keeps banks, InvGC vectors, per-item bank
offsets and activation sets, and turns a `--norm` into weights on the folded ANN columns.

For each bank j the ANN vectors carry one extra column u_j(g) = −(lse_j(g) − m_j)/β_j (m_j a constant that
keeps the column small); a query [q, w] scores ⟨q,g⟩ + Σ w_j u_j(g), which ranks like the inverted softmax
in log space when w_j = β_j/Σβ. See docs/search.md and `xmodal.index.hubness` for the formulas.
"""

from __future__ import annotations

import numpy as np

from xmodal.errors import UserError
from xmodal.index import hubness
from xmodal.index.ann import l2n
from xmodal.index.meta import now

BANKS = ("text", "image")
NORMS = ("none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic")
DEFAULT_BETA = 20.0


class FoldingMixin:
    """Banks, InvGC and the folded offset columns of a `SearchIndex`."""

    @property
    def bank_names(self) -> list[str]:
        return [b for b in BANKS if b in self.info.get("banks", {})]

    def _columns(self) -> np.ndarray:
        """Per item: the centred, β-scaled bank offsets u_j(g) (N×E float32; E = number of banks)."""
        names = self.bank_names
        if not names or self.bank_lse is None:
            return np.zeros((len(self), 0), np.float32)
        cols = []
        for j, b in enumerate(names):
            cfg = self.info["banks"][b]
            cols.append(-(self.bank_lse[:, j] - cfg["offset_mean"]) / cfg["beta"])
        return np.stack(cols, axis=1).astype(np.float32)

    def _lse(self, gallery: np.ndarray) -> np.ndarray:
        cols = [
            hubness.bank_offsets(self.banks[b], gallery, self.info["banks"][b]["beta"])
            for b in self.bank_names
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((len(gallery), 0))

    def _hubs(self) -> np.ndarray:
        cols = [
            hubness.hub_mask(self.banks[b], self.gallery, k=int(self.info["banks"][b].get("hub_k", 1)))
            if len(self)
            else np.zeros(0, bool)
            for b in self.bank_names
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((len(self), 0), bool)

    def _invgc(self, vectors: np.ndarray) -> np.ndarray:
        cfg = self.info["invgc"]
        return hubness.invgc(
            vectors,
            self.banks.get("text"),
            self.banks.get("image"),
            r_q=cfg["r_q"],
            r_g=cfg["r_g"],
            local_adj=cfg["method"] == "localadj",
            pool_rate=cfg["pool_rate"],
        )

    def _update_hubness(self, new: slice | None) -> bool:
        """Bring InvGC vectors, bank offsets and activation sets up to date after rows were appended
        (`new`: those rows) or removed (`new=None`; per-row arrays already filtered). Full InvGC centres on
        the mean over the whole gallery, so any change moves every vector: then all is recomputed and
        True says the ANN must be refilled. LocalAdj and the offsets are per item: only new rows are."""
        whole = False
        if self.info.get("invgc"):
            if self.info["invgc"]["method"] == "invgc":
                self.invgc_vectors = self._invgc(np.asarray(self.vectors))
                whole = True
            elif new is not None:
                self.invgc_vectors = np.concatenate([self.invgc_vectors, self._invgc(self.vectors[new])])
        if self.bank_names:
            if whole:
                self.bank_lse = self._lse(self.gallery)
            elif new is not None:
                self.bank_lse = np.concatenate([self.bank_lse, self._lse(self.gallery[new])])
            self.bank_hubs = self._hubs()
        return whole

    def set_bank(
        self,
        name: str,
        vectors: np.ndarray | None,
        *,
        beta: float = DEFAULT_BETA,
        source: str = "",
        hub_k: int = 1,
        refresh: bool = True,
    ) -> None:
        """Add/replace (or with vectors=None remove) the text or image bank; recomputes offsets and the
        ANN unless refresh=False (then call refresh_hubness() once after several changes)."""
        if name not in BANKS:
            raise UserError(f"bank {name!r}: use text or image")
        with self._writing():
            banks = dict(self.info.get("banks", {}))
            if vectors is None:
                banks.pop(name, None)
                self.banks.pop(name, None)
            else:
                if len(vectors) == 0:
                    raise UserError(f"the {name} bank is empty")
                self.banks[name] = l2n(vectors)
                banks[name] = {
                    "count": len(vectors),
                    "beta": float(beta),
                    "source": source,
                    "hub_k": int(hub_k),
                    "offset_mean": 0.0,
                }
            self.info["banks"] = {b: banks[b] for b in BANKS if b in banks}
            if refresh:
                self.refresh_hubness()

    def set_invgc(
        self,
        method: str | None,
        *,
        r_q: float = 0.1,
        r_g: float = 0.1,
        pool_rate: float = 0.01,
        refresh: bool = True,
    ) -> None:
        """Turn InvGC ("invgc") / InvGC+LocalAdj ("localadj") on the gallery vectors on, or off (None)."""
        if method in (None, "none"):
            cfg = None
        elif method in ("invgc", "localadj"):
            if not self.banks:
                raise UserError(
                    "--invgc needs a bank: add one with `xmodal index bank INDEX --data MANIFEST`"
                )
            cfg = {"method": method, "r_q": float(r_q), "r_g": float(r_g), "pool_rate": float(pool_rate)}
        else:
            raise UserError(f"--invgc {method}: use none, invgc or localadj")
        with self._writing():
            self.info["invgc"] = cfg
            if refresh:
                self.refresh_hubness()

    def refresh_hubness(self) -> None:
        """Recompute InvGC vectors, bank offsets and activation sets, then rebuild the ANN structure."""
        with self._writing():
            self.invgc_vectors = self._invgc(np.asarray(self.vectors)) if self.info.get("invgc") else None
            if self.bank_names:
                self.bank_lse = self._lse(self.gallery)
                for j, b in enumerate(self.bank_names):
                    mean = float(self.bank_lse[:, j].mean()) if len(self) else 0.0
                    self.info["banks"][b]["offset_mean"] = mean
                self.bank_hubs = self._hubs()
            else:
                self.bank_lse = self.bank_hubs = None
            self.rebuild_ann()
            self.info["updated"] = now()

    def available_norms(self, modality: str = "text") -> list[str]:
        """The --norm values this index's banks support for queries of `modality`."""
        banks = set(self.bank_names)
        out = ["none"]
        qb = "text" if modality == "text" else "image"
        if qb in banks:
            out += ["qbnorm", "qbnorm-dynamic"]
            if "image" in banks:
                out += ["dbnorm", "dbnorm-dynamic"]
        return out

    def _factors(self, norm: str, modality: str) -> list[tuple[int, float]]:
        """(bank column, β) of each inverted-softmax factor that `norm` multiplies together."""
        names = self.bank_names
        if norm in (None, "", "none"):
            return []
        if norm not in NORMS:
            raise UserError(f"--norm {norm}: use one of {', '.join(NORMS)}")
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be text or image, not {modality!r}")
        qbank = "text" if modality == "text" else "image"
        need = [qbank] + (["image"] if norm.startswith("dbnorm") else [])
        for b in need:
            if b not in names:
                how = "--texts FILE or --data MANIFEST" if b == "text" else "--data MANIFEST"
                raise UserError(
                    f"--norm {norm}: the index has no {b} bank; add one with "
                    f"`xmodal index bank {self.path or 'INDEX'} {how}`"
                )
        return [(names.index(b), float(self.info["banks"][b]["beta"])) for b in need]
