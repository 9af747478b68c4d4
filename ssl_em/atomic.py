"""Atomic files and folders: readers see the old content or the new, never a mix or a half.

`write_atomic` writes one file through a temporary file renamed over it; `replace_folder`
writes a whole folder (weights + metadata of one run) and swaps it in one step. Both give
the result the mode a plain open() would (0666 & ~umask), so shared folders stay readable.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ssl_em.errors import UserError, check_parent_folders


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write the file `path` whole or not at all. `data` (text, bytes, or a callable that writes
    the whole file at the path it is given) goes to a temporary file beside `path`, named after
    this process so concurrent writers never share one, which then replaces `path` in one
    rename. The result gets the mode a plain open() would give (0666 & ~umask; some writers,
    safetensors, create 0600). The temporary file never outlives a failure. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[dict], **writer_args) -> Path:
    """A CSV table, header then `rows`, written with `write_atomic` (never half a table).
    writer_args go to csv.DictWriter (extrasaction="ignore", say)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), **writer_args)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write)


def check_out_folder(out: str | Path, marker: str) -> Path:
    """`out` may be missing, empty, or an earlier model folder (it holds `marker`); anything
    else is refused (UserError) rather than replaced: it may be the user's own files."""
    out = recover_folder(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out must be a folder (missing, empty, or an earlier export)")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UserError(f"{out}: is a non-empty folder without {marker}, not an earlier export; refusing to replace it (choose another --out)")
    check_parent_folders(out, str(out))
    return out


def replace_folder(out: str | Path, fill, marker: str) -> Path:
    """Write a whole folder at once: `fill(tmp)` writes every file into a temporary folder
    beside `out`, which then takes `out`'s place. Readers see the old folder or the new one,
    never weights of one run beside metadata of another.

    An existing `out` is swapped with the new folder in one step (Linux renameat2
    RENAME_EXCHANGE), so `out` exists at every instant. Where that call is missing (other
    systems, some network file systems) the old folder is first renamed to `.NAME.old`
    beside it: a crash between the two renames leaves it there, and the next export or load
    of `out` (`recover_folder`) puts it back. Returns `out`."""
    out = check_out_folder(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared model from the group
        fill(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600; give what a plain open() would
            os.chmod(f, 0o666 & ~_umask())
        if not out.exists():
            os.replace(tmp, out)
        elif exchange_paths(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = _old_copy(out)
            shutil.rmtree(old, ignore_errors=True)  # a leftover of a crash whose `out` was since rewritten
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the old one back: `out` must not vanish
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _old_copy(out: Path) -> Path:
    """Where replace_folder keeps the old `out` between its two renames (without renameat2)."""
    return out.with_name(f".{out.name}.old")


def recover_folder(out: str | Path) -> Path:
    """Put back a folder that a crash inside replace_folder's fallback left as `.NAME.old`
    (only when `out` itself is missing, so nothing is ever overwritten). Returns `out`."""
    out = Path(out)
    old = _old_copy(out)
    if not out.exists() and old.is_dir():
        try:
            os.replace(old, out)
        except OSError:  # another process recovered it first, or the folder is read-only
            pass
    return out


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the two existing paths `a` and `b` atomically (Linux renameat2 with
    RENAME_EXCHANGE, glibc >= 2.28). False where the system or file system lacks it;
    OSError naming both paths for any other failure."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux/glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere reading it means setting it
    (briefly, so another thread creating a file at that instant could get mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
