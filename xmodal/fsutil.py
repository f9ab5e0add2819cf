"""Crash-safe file and folder writes: the one place xmodal writes a file that must never be half-written.

`write_atomic` (and its text/bytes/torch shorthands) writes a temp file beside the target, fsyncs it and
renames it over the target. A whole index directory is written into a temporary folder beside the target
and then swapped in.
On Linux the swap is one atomic `renameat2(RENAME_EXCHANGE)`; elsewhere (or when the filesystem
refuses) it is two renames with the previous version parked at `.NAME.previous`, which `recover_dir`
puts back if a crash lands between them. Either way a reader sees the old or the new index, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` into a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """torch.save through `write_atomic` (torch imported here only: the index layer stays torch-free)."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f))


def load_torch_safe(path: str | Path, what: str) -> Any:
    """torch.load that never runs code: tensors and plain containers only (`weights_only=True`). A file
    holding any other pickled object is a one-line UserError naming `what` (the flag or file)."""
    import pickle

    import torch

    from xmodal.errors import UserError

    try:  # TorchVersion (a str) is allowed: checkpoints of earlier xmodal versions recorded one
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{what} {path}: holds pickled Python objects beyond tensors; xmodal loads weights only "
            "(re-save it as a plain state dict, or as .safetensors)"
        ) from e
    except (EOFError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{what} {path}: not a readable PyTorch file ({first})") from e


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False when unsupported here."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def backup_path(final: Path) -> Path:
    return final.parent / f".{final.name}.previous"


def temp_dir_for(final: Path) -> Path:
    """A fresh temp folder beside `final` (same filesystem, so the swap is a rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the fully written folder `tmp` become `final`, replacing any previous `final` atomically."""
    fsync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
    else:
        backup = backup_path(final)
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(final, backup)
        os.rename(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(final.parent)


def recover_dir(final: Path) -> None:
    """Undo a crash between the two fallback renames: bring the parked previous version back."""
    backup = backup_path(final)
    if not final.exists() and backup.is_dir():
        os.rename(backup, final)


_held: set[str] = set()


@contextlib.contextmanager
def locked(final: Path) -> Iterator[None]:
    """Exclusive writer lock for an index path (`.NAME.lock` beside it), so two writers never interleave.
    Re-entrant within one process (build → save)."""
    final = Path(final).absolute()
    if str(final) in _held:
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".{final.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from xmodal.errors import UserError

            raise UserError(
                f"{final}: another xmodal process is writing it; wait for that one to finish"
            ) from None
        _held.add(str(final))
        try:
            yield
        finally:
            _held.discard(str(final))
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
