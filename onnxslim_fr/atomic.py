"""Atomic file writes: a file appears complete under its name, or not at all.

On Linux a file is written into an unnamed inode (O_TMPFILE) that the kernel frees if the
process dies, and is given its name only when complete (`link` of /proc/self/fd/N, then a
rename over an existing file): a killed run leaves nothing behind. Elsewhere a hidden
temporary file beside the target is used and removed on failure. Either way the file's
mode follows the umask like any newly created file (mkstemp alone would give 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_UNNAMED = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def staged() -> Iterator[Callable[[str | os.PathLike[str]], BinaryIO]]:
    """`stage(path)` gives a file to write; when the block ends normally the staged files
    are put in place in the order they were staged, each by one rename, and when it raises
    they vanish."""
    pending: list[_Pending] = []

    def stage(target: str | os.PathLike[str]) -> BinaryIO:
        pending.append(_Pending(Path(target)))
        return pending[-1].file

    try:
        yield stage
        _publish(pending)
    finally:
        for p in pending:
            p.discard()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with staged() as stage:
        stage(path).write(data)


def _publish(pending: list[_Pending]) -> None:
    """In order; once one file is in place the next one follows even if an interrupt
    arrives in between (a model must not be left with weights it does not reference)."""
    if not pending:
        return
    try:
        pending[0].publish()
    finally:
        if pending[0].done:
            _publish(pending[1:])


class _Pending:
    """One file being written beside its target."""

    def __init__(self, target: Path) -> None:
        self.target, self.tmp, self.done = target, None, False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_unnamed(target.parent)
        if fd is None:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent)
            self.tmp = Path(name)
            os.fchmod(fd, 0o666 & ~_umask())
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def publish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tmp is None:  # unnamed: name it, directly when the target does not exist
            proc = f"/proc/self/fd/{self.file.fileno()}"
            try:
                _link(proc, self.target)
                self.done = True
            except FileExistsError:
                self.tmp = _link_hidden(proc, self.target)
        if not self.done:
            os.replace(self.tmp, self.target)
            self.done = True
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        if self.tmp is not None and not self.done:
            self.tmp.unlink(missing_ok=True)


def _open_unnamed(directory: Path) -> int | None:
    if not _UNNAMED:
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError:  # filesystem without O_TMPFILE support: mkstemp reports real errors
        return None


def _link_hidden(proc: str, target: Path) -> Path:
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{os.urandom(4).hex()}.tmp")
        try:
            _link(proc, tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _link(proc: str, target: Path) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of the /proc magic link. A directory fd is passed because
    CPython < 3.12 calls plain link(), which would link the /proc symlink itself."""
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(proc, target.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
