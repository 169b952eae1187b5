"""Writing outputs without losing anything: staged folders swapped in whole, atomic files, and a
refusal to replace a folder that UMIM did not write.

A folder is "ours" when it holds the marker file of its kind (``rules.json`` for rules,
``config.json`` with ``"format": "umim-merger"`` for a merger, ...). Replacing one renames the old
folder aside, renames the new one in and only then removes the old one, so a failure at any point
leaves a complete folder (the old or the new) in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from umim.errors import UserError


class OutputError(UserError):
    """An output path cannot be written without destroying something UMIM did not write."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(dst: str | os.PathLike) -> Path:
    """A fresh hidden folder beside ``dst`` (same file system, so it can be renamed onto ``dst``),
    with the permissions the user's umask gives new folders (``mkdtemp`` alone makes them 0700)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def check_replaceable(dst: str | os.PathLike, is_ours: Callable[[Path], bool], what: str) -> None:
    """Raise :class:`OutputError` unless ``dst`` is absent, an empty folder, or a ``what`` folder we wrote."""
    dst = Path(dst)
    for _ in range(5):  # another writer may be swapping dst while we look: a folder mid-swap is looked at again
        try:
            if not stat.S_ISDIR(dst.stat().st_mode):
                raise OutputError(f"{dst} is a file, not a {what} folder: choose another output path")
            if not any(dst.iterdir()) or is_ours(dst):
                return
        except FileNotFoundError:
            continue
        except NotADirectoryError as e:
            raise OutputError(f"{dst} lies under a file, not a folder: choose another output path") from e
    if not dst.exists():
        return
    raise OutputError(f"{dst} holds files that are not a {what} folder; refusing to replace it: "
                      "choose another output path or move those files")


def replace_dir(tmp: Path, dst: str | os.PathLike, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Move the finished folder ``tmp`` to ``dst``, replacing an earlier ``what`` folder there."""
    dst, tmp = Path(dst), Path(tmp)
    check_replaceable(dst, is_ours, what)
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    moved = None
    try:
        for attempt in range(100):  # another writer may swap its own folder in between: then try again
            try:
                if dst.exists():
                    moved = aside / str(attempt)
                    os.replace(dst, moved)
                os.replace(tmp, dst)
                shutil.rmtree(aside, ignore_errors=True)  # only now is the old folder given up
                return dst
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                continue  # dst moved away by the other writer
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise OutputError(f"{dst}: other processes keep replacing it; try again")
    except BaseException:
        if moved is not None and moved.exists() and not dst.exists():
            os.replace(moved, dst)  # put the previous folder back
        if aside.exists() and not any(aside.iterdir()):
            aside.rmdir()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable_dir(path: str | os.PathLike) -> None:
    """Raise :class:`OutputError` when ``path`` cannot become or be a writable folder (checked before long work)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{path}: {probe} is a file, not a folder: choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: {probe} is not writable: choose another output path")
