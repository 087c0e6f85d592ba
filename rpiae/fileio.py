"""Small file helpers: atomic writes (nothing half-written ever looks finished) and hashes.

Files and folders written here get the modes a plain `open()` / `mkdir()` would give them
(`0o666 & ~umask`, `0o777 & ~umask`), not the private 0600/0700 of `tempfile`'s names: a
trainer under another account, or a teammate on shared storage, reads what a job wrote.
A killed write leaves at most a hidden `.NAME.XXXXXXXX.tmp` file (or `.partial` folder);
`remove_stale_temps` clears those of an earlier run when a job starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# what tempfile.mkstemp / mkdtemp make in atomic_file / atomic_dir: .NAME.<8 random chars>.tmp|.partial
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|partial)$")


def umask() -> int:
    """This process's umask (read without changing it where Linux says it, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class WriteError(OSError):
    """A write that failed (disk full, quota, I/O error), as one line naming the file."""


def _write_error(path: Path, e: BaseException) -> WriteError:
    text = " ".join(str(e).split()) or type(e).__name__
    return WriteError(f"cannot write {path}: {text}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~umask())
        try:
            yield tmp_path
        except OSError as e:
            # a failed write of this file (disk full, quota, I/O error, read-only): one line naming
            # it; other OSErrors raised inside the block (reading an input) pass through as they are
            if not isinstance(e, WriteError) and (
                    e.errno in _WRITE_ERRNOS or (e.filename is not None and str(e.filename) == str(tmp_path))):
                raise _write_error(path, e) from None
            raise
        except Exception as e:
            # libraries that write files report a full disk in their own error types
            # (safetensors' SafetensorError, torch's RuntimeError from its zip writer)
            if type(e).__name__ == "SafetensorError" or (
                    isinstance(e, RuntimeError) and ("No space left" in str(e) or "failed writing" in str(e))):
                raise _write_error(path, e) from None
            raise
        os.chmod(tmp_path, 0o666 & ~umask())  # again: some writers (safetensors) replace the file they are given
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None  # libc's renameat2, looked up on first use (False: not available)


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    C library, kernel or file system cannot, and nothing changed."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            pass
    if not _renameat2:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replaced_name(path: Path) -> Path:
    """Where `atomic_dir(path, overwrite=True)` parks the old `path` between its two renames
    (only where the two paths cannot be exchanged in one step)."""
    return path.with_name(f".{path.name}.old")


def recover_replaced(path: str | Path) -> bool:
    """Put back the previous `path` when a replacing `atomic_dir` was killed between moving
    it aside and moving the new one in (then `path` is missing and `.NAME.old` is complete).
    True when something was recovered. Readers of a path written with `overwrite=True` call
    this before looking; `atomic_dir` does it itself."""
    path = Path(path)
    old = _replaced_name(path)
    if os.path.lexists(path) or not os.path.isdir(old):
        return False
    try:
        os.rename(old, path)
    except OSError:
        return os.path.lexists(path)  # another process recovered it first
    return True


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`, renamed onto `path` only on success.

    An interrupted run leaves at most a hidden `.NAME.*.partial` directory, never a partial
    `path`. With `overwrite`, a complete `path` exists at every moment where the system can
    exchange two paths atomically (Linux renameat2); elsewhere the old one is moved aside to
    `.NAME.old` first, and if the process dies before the new one is in place,
    `recover_replaced` (called here and by readers) puts it back.
    """
    path = Path(path)
    recover_replaced(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, name=path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if path.exists():
            old = _replaced_name(path)
            shutil.rmtree(old, ignore_errors=True)
            if not _exchange(tmp, path):  # tmp now holds the old path, removed below
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def process_start() -> float:
    """When this process started (seconds since the epoch)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no psutil, or no process table: now is late enough
        return time.time()


def remove_stale_temps(folder: str | Path, name: str | None = None, before: float | None = None) -> list[Path]:
    """Remove the temporary files and folders atomic_file/atomic_dir left in `folder` when a
    write was killed (`.NAME.XXXXXXXX.tmp`, `.NAME.XXXXXXXX.partial`; only `name`'s when given),
    last modified before `before` (default: this process's start, so that what another live
    process is writing right now stays). Returns what was removed."""
    folder = Path(folder)
    before = process_start() if before is None else before
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not _TEMP_NAME.match(e.name) or (name is not None and not e.name.startswith(f".{name}.")):
            continue
        try:
            if e.stat(follow_symlinks=False).st_mtime >= before:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            continue  # gone already (another rank), or not ours to remove
    return removed


def read_json(path: str | Path, what: str) -> object:
    """The JSON value in file `path`; a one-line ValueError naming the file and `what` it should
    be (`"an rpiae bench result"`) when it cannot be read or is not JSON text."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not {what}: not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not {what}: not JSON ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: not {what}: a directory") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read {what} ({e.strerror or e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
