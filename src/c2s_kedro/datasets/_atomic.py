"""Atomic writes that leave files with the permissions a plain ``open()`` would give them.

``tempfile.mkstemp``/``mkdtemp`` create private files (0600) and folders (0700) so that nobody
reads them half-written; once complete, a saved file or model folder gets ``0o666``/``0o777``
less the umask, so collaborators on a shared project directory can read it as the umask allows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """This process's umask (read from /proc where it can be, so no other thread sees it change)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path | str) -> None:
    """Give a file 0o666, a folder 0o777, less the umask (what ``open``/``mkdir`` would have given)."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~current_umask())


def share_tree_as_umask_allows(folder: Path | str) -> None:
    """``share_as_umask_allows`` for a folder and everything in it (``save_pretrained`` also
    writes some files through private temporary files)."""
    share_as_umask_allows(folder)
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            share_as_umask_allows(os.path.join(parent, name))


@contextmanager
def atomic_file(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``target`` to write to; when the block completes the file gets the
    umask's permissions and replaces ``target`` at once, otherwise it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        share_as_umask_allows(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A new folder next to ``target`` to write into; when the block completes it gets the umask's
    permissions and takes ``target``'s place (the previous folder is removed after the swap), so
    an interrupted save leaves the previous one untouched; otherwise it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        share_tree_as_umask_allows(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            retired.rmdir()
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
