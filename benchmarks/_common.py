"""Shared helpers for the benchmark scripts: machine description, Markdown tables, recording results into
BENCHMARKS.md, built-in data sets, and peak-memory measurement of child processes (Linux /proc, no extra
dependency).

Every script records its table under its own section of BENCHMARKS.md (between the
`<!-- results:NAME -->` … `<!-- /results:NAME -->` markers), newest run last, with the command, the date
and the machine, so results from different machines or days are never mixed up in one table.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fcntl
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
DEFAULT_WORK = Path(os.environ.get("XMODAL_BENCH_DIR", "/tmp/xmodal-bench"))


# -- machine --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16). Without it, bf16 autocast on a
    CPU is emulated through fp32 and slower than fp32 itself, so the benchmarks then run fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def isa_line(flags: set[str] | None = None) -> str:
    """The ISA extensions that decide CPU training/inference speed, and whether bf16 is native."""
    flags = cpu_flags() if flags is None else flags
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"ISA {'/'.join(isa) or '-'} (native bf16: {'yes' if native_bf16(flags) else 'no'})"


def _torch_kernels(torch) -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "?"


def xmodal_precision(precision: str = "auto") -> str:
    """What xmodal's --precision resolves to on this CPU ("bf16" or "fp32"), by xmodal's own rule."""
    import torch

    from xmodal.train.precision import resolve_precision

    dt = resolve_precision(precision, torch.device("cpu"))
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def machine_line() -> str:
    """One line: CPU model, logical cores, notable ISA, RAM, torch/open_clip/faiss versions, load average."""
    import torch

    flags = cpu_flags()
    try:
        mem_kb = int(
            next(
                ln.split()[1]
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")
            )
        )
        mem = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = "? RAM"
    parts = [
        f"{cpu_model()}",
        f"{os.cpu_count()} logical cores",
        isa_line(flags),
        mem,
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, {_torch_kernels(torch)} kernels)",
    ]
    for mod in ("open_clip", "faiss"):
        try:
            m = __import__(mod)
            parts.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            pass
    parts.append(f"Python {platform.python_version()}")
    try:
        parts.append("load avg at start " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    except OSError:
        pass
    return ", ".join(parts)


# -- tables and recording -------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:  # NaN
            return "–"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def benchmarks_md() -> Path:
    """The results file: BENCHMARKS.md at the repository root, or $XMODAL_BENCHMARKS_MD (tests, dry runs)."""
    return Path(os.environ.get("XMODAL_BENCHMARKS_MD") or BENCHMARKS_MD)


def add_training_run_args(p, *, steps: int, batch_size: int, min_skip: int, runs_dir: str) -> None:
    """The flags every trainer-against-trainer benchmark shares: steps, batch, lr, the warm-up steps left
    out of the rates, where the runs go and whether they are kept."""
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps per training run")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--skip",
        type=int,
        default=None,
        help=f"warm-up steps left out of the rates (default: steps/10, ≥{min_skip})",
    )
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument(
        "--keep", action="store_true", help=f"keep the runs, checkpoints and logs (WORK/{runs_dir}/run-PID)"
    )


def add_record_args(p) -> None:
    """--no-write (alias --no-record): print the block only; --record-to FILE: append to FILE instead."""
    p.add_argument(
        "--no-write",
        "--no-record",
        dest="no_write",
        action="store_true",
        help="print the result block only; do not append it to BENCHMARKS.md",
    )
    p.add_argument(
        "--record-to",
        type=Path,
        default=None,
        metavar="FILE",
        help="append the result block to FILE instead of BENCHMARKS.md (env XMODAL_BENCHMARKS_MD)",
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock (fcntl.flock, blocking) on `.NAME.lock` beside `path`, so the read-modify-write of
    two recording scripts never interleaves. The lock file is left in place: unlinking a lock file lets a
    late opener lock a different inode than an earlier one."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _between_read_and_write() -> None:
    """Test hook (a no-op): tests replace it with a sleep to widen the read-modify-write window."""


def record(
    name: str,
    title: str,
    body: str,
    machine: str,
    command: str | None = None,
    started: float | None = None,
    write: bool = True,
    path: Path | str | None = None,
) -> None:
    """Print the result block and append it to the results file (BENCHMARKS.md by default) inside the `name`
    section. The read-modify-write holds a file lock and the file is replaced atomically, so two scripts
    recording at once keep both blocks and a crash never leaves half a file."""
    from xmodal.fsutil import write_text_atomic

    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    took = f", took {time.time() - started:.0f} s" if started else ""
    block = (
        f"#### {title} — {when}\n\n`{command or command_line()}`  \n"
        f"Machine: {machine}{took}\n\n{body.strip()}\n"
    )
    print("\n" + block)
    if not write:
        print("(not recorded: --no-write)")
        return
    target = Path(path) if path else benchmarks_md()
    begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    with _locked(target):
        text = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
        if begin not in text or end not in text:
            text = text.rstrip("\n") + f"\n\n## {name}\n\n{begin}\n{end}\n"
        head, rest = text.split(end, 1)
        text = head.rstrip("\n") + "\n\n" + block + "\n" + end + rest
        _between_read_and_write()
        write_text_atomic(target, text)
    try:
        shown = target.resolve().relative_to(REPO)
    except ValueError:
        shown = target
    print(f"(appended to {shown})")


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# -- data -----------------------------------------------------------------------------------------------


def ensure_shapes(work: Path, n_train: int = 5000, n_test: int = 1000) -> Path:
    """work/shapes (train/val/test.jsonl + images), generated once."""
    from xmodal.data import make_shapes

    out = work / f"shapes-{n_train}"
    if not (out / "test.jsonl").is_file():
        print(f"generating shapes in {out} …", flush=True)
        make_shapes(out, n_train=n_train, n_val=200, n_test=n_test)
    return out


def ensure_emoji(work: Path) -> Path | None:
    """work/emoji, generated once; None (with a note) when the font / Unicode data are missing."""
    out = work / "emoji"
    if (out / "test.jsonl").is_file():
        return out
    try:
        from xmodal.data import make_emoji
    except ImportError:
        print("note: xmodal.data.make_emoji not available; skipping emoji")
        return None
    try:
        print(f"generating emoji in {out} …", flush=True)
        make_emoji(out)
    except Exception as e:  # noqa: BLE001 - missing font/CLDR data: skip the data set, say why
        print(f"note: emoji data set not generated ({str(e).splitlines()[0]}); skipping emoji")
        return None
    return out


def dataset_dirs(work: Path, names: Sequence[str], shapes_images: int = 5000) -> dict[str, Path]:
    out = {}
    for n in names:
        if n == "shapes":
            out[n] = ensure_shapes(work, n_train=shapes_images)
        elif n == "emoji":
            d = ensure_emoji(work)
            if d is not None:
                out[n] = d
        else:
            raise SystemExit(f"--datasets {n}: use shapes and/or emoji")
    return out


def manifest_rows(jsonl: Path) -> list[dict]:
    return [json.loads(ln) for ln in jsonl.read_text(encoding="utf-8").splitlines() if ln.strip()]


def write_pairs_csv(jsonl: Path, out: Path, max_rows: int | None = None) -> int:
    """JSONL manifest → open_clip CSV (filepath,title), one row per (image, caption) pair, absolute paths
    (open_clip opens the path as written, relative to its working directory). xmodal reads the same file
    and merges the rows of one image back into one record with several captions."""
    rows = []
    for r in manifest_rows(jsonl):
        caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        path = str((jsonl.parent / r["image"]).resolve())
        rows += [{"filepath": path, "title": c} for c in caps]
    if max_rows is not None:
        rows = rows[:max_rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    from xmodal.fsutil import write_text_atomic

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["filepath", "title"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out, buf.getvalue())
    return len(rows)


# -- memory of a process tree ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat, idle and iowait excluded)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    busy = sum(f) - f[3] - (f[4] if len(f) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


class Background:
    """Share of the machine's CPU used by *other* processes while a block runs: (busy − own) / (wall × cores).
    Printed next to timings because this machine is shared and timings move with it."""

    def __init__(self, own_cpu=None) -> None:
        import resource

        self._own = own_cpu or (lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))

    def __enter__(self) -> Background:
        self.t0, self.b0, self.o0 = time.perf_counter(), cpu_busy_s(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        other = (cpu_busy_s() - self.b0) - (self._own() - self.o0)
        self.share = max(0.0, other) / (self.wall * (os.cpu_count() or 1))


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    peak_rss_mib: float  # the child's own RSS high-water mark (VmHWM of its exec'd image, polled)
    peak_tree_pss_mib: float  # max over time of the summed PSS of the process and its children (polled)
    peak_tree_rss_mib: float  # same with RSS (double-counts pages shared by forked workers)
    cpu_s: float = 0.0  # user+system CPU seconds of the child and its waited-for children
    background: float = 0.0  # share of all cores used by other processes meanwhile (0..1)
    stdout: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(
    cmd: Sequence[str],
    log: Path,
    env: dict | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.5,
    timeout: float | None = None,
) -> RunResult:
    """Run cmd as a child process, stdout+stderr to `log`; measure wall time and peak memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = {"pss": 0, "rss": 0, "hwm": 0}
    own_cmdline = Path("/proc/self/cmdline").read_bytes()
    t0, busy0 = time.perf_counter(), cpu_busy_s()
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                pss = rss = 0
                for p in _tree(proc.pid):
                    pss += _kb(f"/proc/{p}/smaps_rollup", "Pss:")
                    rss += _kb(f"/proc/{p}/status", "VmRSS:")
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                # VmHWM, not wait4's ru_maxrss: Linux carries the parent's RSS at fork into the child's
                # ru_maxrss, so a big parent would inflate every child's figure
                # (and not before the exec: the forked copy still has this process's command line)
                try:
                    exec_done = Path(f"/proc/{proc.pid}/cmdline").read_bytes() != own_cmdline
                except OSError:
                    exec_done = False
                if exec_done:
                    peak["hwm"] = max(peak["hwm"], _kb(f"/proc/{proc.pid}/status", "VmHWM:"))
                done.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0) if timeout is None else _wait4_timeout(proc, timeout)
        finally:
            done.set()
            th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, cpu_busy_s() - busy0 - cpu) / (wall * (os.cpu_count() or 1))
    return RunResult(
        proc.returncode,
        wall,
        peak["hwm"] / 1024,
        peak["pss"] / 1024,
        peak["rss"] / 1024,
        cpu,
        other,
        log.read_text(errors="replace"),
    )


def _wait4_timeout(proc: subprocess.Popen, timeout: float):
    end = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, ru
        if time.monotonic() > end:
            proc.kill()
            return os.wait4(proc.pid, 0)
        time.sleep(0.2)


def xmodal_env() -> dict:
    """Environment for child processes: quiet, no tokenizer thread pools fighting for the 2 cores."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- compute peak --------------------------------------------------------------------------------------


def matmul_peak(
    n: int = 2048,
    reps: int = 10,
    bf16_reps: int | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
) -> dict[str, float]:
    """Best-of-`reps` FLOP/s of an n×n @ n×n matmul in fp32 and bf16 on this CPU (all torch threads).
    `bf16_reps`: fewer bf16 repeats where bf16 is emulated (slow, and only shown for contrast)."""
    import torch

    out = {}
    for dt in (getattr(torch, d) for d in dtypes):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(reps if dt == torch.float32 or bf16_reps is None else bf16_reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t)
        out[str(dt).replace("torch.", "")] = 2 * n**3 / best
    return out


def peak_at(dtype: str) -> float:
    """The measured matmul peak (FLOP/s) at the dtype a trainer runs: "bf16" or "fp32"."""
    name = "bfloat16" if dtype == "bf16" else "float32"
    return matmul_peak(dtypes=(name,))[name]


# -- a trained model for the benchmarks that need real embeddings -----------------------------------------


def ensure_model(work: Path, data_dir: Path, steps: int = 300, model: str = "xm-tiny") -> Path:
    """An xmodal run trained on data_dir/train.jsonl (trained once, then reused): the run directory."""
    run = work / "models" / f"{data_dir.name}-{model}-{steps}"
    if (run / "checkpoints" / "latest.pt").is_file():
        return run
    print(
        f"training {model} on {data_dir.name} for {steps} steps → {run} (once; reused afterwards) …",
        flush=True,
    )
    tmp = run.with_name(f".{run.name}.tmp{os.getpid()}")  # trained aside, renamed when complete
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "xmodal",
        "train",
        "--data",
        str(data_dir / "train.jsonl"),
        "--out",
        str(tmp),
        "--model",
        model,
        "--batch-size",
        "128",
        "--steps",
        str(steps),
        "--lr",
        "1e-3",
        "--warmup",
        str(max(1, steps // 10)),
        "--weight-decay",
        "0.1",
        "--save-every",
        str(steps),
        "--no-progress",
        "--cache-dir",
        str(work / "cache"),
    ]
    r = subprocess.run(cmd, env=xmodal_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"training the benchmark model failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    if (run / "checkpoints" / "latest.pt").is_file():  # another invocation finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return run
    shutil.rmtree(run, ignore_errors=True)
    tmp.rename(run)
    return run


def embed_split(encoder, data_dir: Path, split: str, work: Path):
    """(image embeddings N×D, caption embeddings T×D, caption→image index T, data) of one split (float32)."""
    import numpy as np

    from xmodal.data import load_dataset

    data = load_dataset(
        data_dir / f"{split}.jsonl", encoder.image_size, cache_dir=work / "cache", progress=False
    )
    img = encoder.encode_images(data.images).numpy().astype(np.float32)
    caps = [c for cs in data.captions for c in cs]
    owner = np.array([i for i, cs in enumerate(data.captions) for _ in cs])
    txt = encoder.encode_texts(caps).numpy().astype(np.float32)
    return img, txt, owner, data


def run_xmodal_quiet(argv: Sequence) -> float:
    """`xmodal ARGV` in this process with its output swallowed (no interpreter start-up per run); wall s."""
    from xmodal.cli import app

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        app([str(x) for x in argv], standalone_mode=False)
    return time.perf_counter() - t0
