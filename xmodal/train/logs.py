"""What a run reports: metrics.jsonl + TensorBoard, the progress bar, and loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from xmodal.fsutil import write_atomic, write_text_atomic


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard events in the run directory."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= resume_step
            ]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self.fh = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        step = record.get("step", 0)
        for k, v in _flatten(record).items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.fh.close()
        self.tb.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class Progress:
    """A rich progress bar with loss, samples/s and ETA (rank 0 only)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[sps]} samples/s"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.p.add_task("train", total=total, completed=start, loss="-", sps="-")
        self.t0, self.n0 = time.perf_counter(), 0
        self.p.start()

    def update(self, done: int, loss: float, batch: int, terms: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.n0 += batch
        sps = self.n0 / max(1e-9, time.perf_counter() - self.t0)
        shown = f"{loss:.4f}"
        if terms and len(terms) > 1:  # a composite objective: each term beside the total
            shown += " (" + " · ".join(f"{k} {v:.3f}" for k, v in terms.items()) + ")"
        self.p.update(self.task, completed=done, loss=shown, sps=f"{sps:.0f}")

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


def plot_loss_curve(metrics: Path, out: Path) -> None:
    """loss.png from metrics.jsonl (training loss, and validation R@1 where logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    vals = [
        (r["step"], r["val"]["retrieval"]["t2i"]["R@1"])
        for r in rows
        if "val" in r and "retrieval" in r["val"]
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts, strict=True), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals, strict=True), "o-", color="tab:orange", label="val t2i R@1")
        ax2.set_ylabel("R@1")
    ax.set_title(metrics.parent.name)
    fig.tight_layout()
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
