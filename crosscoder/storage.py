"""Writing safely: atomic files, folders built under a hidden name then renamed, safetensors files with the
umask's mode, and storage failures (a full disk, a quota, a read-only or unwritable folder) turned into one line
naming the file.

A leaf: every floor may import it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from crosscoder.errors import StorageError, exit_bad_input


def temporary_sibling(path: Path, tag: str) -> Path:
    """A unique dot-name next to `path` (same filesystem, so a rename is atomic; hidden, so never mistaken for it)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    tmp = temporary_sibling(path, "tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_file_mode() -> int:
    """The mode a new file gets under this process's umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The umask, read without changing it where Linux shows it (os.umask can only be read by setting it, and
    another thread creating a file in between would get the temporary value)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o077)  # the strictest value in the moment between the two calls
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file under a temporary sibling name, then renamed: never half a file under `path`, and
    the mode of any other new file (save_file makes 0600, so a group sharing a cache could not read it)."""
    from safetensors.torch import save_file  # here: loads torch, and a leaf stays cheap to import

    tmp = temporary_sibling(path, "tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def give_new_file_mode(paths: Iterable[Path]) -> None:
    """Files another library wrote with a narrower mode than the umask gives (HF save_pretrained's
    safetensors): given the mode of any other new file."""
    mode = new_file_mode()
    for path in paths:
        os.chmod(path, mode)


@contextlib.contextmanager
def building_dir(out_dir: Path) -> Iterator[Path]:
    """A folder to fill under a hidden sibling name: renamed to `out_dir` (replacing an older one) when the block
    ends, removed if it raises, so `out_dir` is never seen half-written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_dir, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first (directories cannot be replaced in one step)."""
    if dst.exists():
        trash = temporary_sibling(dst, "old")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)

_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "a file-size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


LOW_SPACE_BYTES = 64 * 2**20
"""A write that failed with this little space left on its file system is taken to have failed for lack of it."""


def exit_if_storage_failed(prog: str, error: OSError, fallback: str | Path) -> None:
    """A command-line tool's write that failed for want of storage (a full disk, read-only, no permission): one
    line naming the file, exit EXIT_BAD_INPUT. Returns for any other error, which the caller re-raises."""
    reason = write_failure_reason(error, Path(error.filename or fallback))
    if reason is not None:
        exit_bad_input(prog, f"cannot write {error.filename}: {reason}")


def write_failure_reason(error: BaseException, path: Path) -> str | None:
    """Why a write to `path` failed, in words, when the cause is the storage (None for anything else). torch's
    and safetensors' writers lose the errno (`enforce fail at inline_container.cc`), so a failure on a file
    system with almost no space left is put down to that."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_ERRNOS:
            return f"{_WRITE_ERRNOS[seen.errno]} ([Errno {seen.errno}] {seen.strerror})"
        seen = seen.__cause__ or seen.__context__
    if "No space left" in str(error):
        return "no space left on the device"
    free, folder = free_space(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return f"no space left on the device ({free / 2**20:,.1f} MiB free on {folder})"
    return None


def free_space(path: Path) -> tuple[int | None, Path | None]:
    """Bytes free on the file system `path` is on (or would be: its nearest existing folder), and that folder."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free, folder
    return None, None


@contextlib.contextmanager
def writing(what: str, path: Path, state_dir: Path | None = None, hint: str = "") -> Iterator[None]:
    """Turn a storage failure while writing `what` at `path` into one StorageError line; other errors pass."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        reason = write_failure_reason(error, Path(path))
        if reason is None:
            raise
        raise StorageError(f"cannot write {what} {path}: {reason}{hint}", state_dir) from error
