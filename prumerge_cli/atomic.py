"""Atomic writes: build under a temporary name beside the target, then rename into place. Outputs get the usual
permissions (0666 / 0777 less the umask), not the private ones of temporary files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import PrumergeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file atomically."""
    path = Path(path)
    if path.is_dir():
        raise PrumergeError(f"{path} is a directory; a file is needed")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise PrumergeError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_file_output(path: str | Path | None, force: bool = False, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a file output that cannot be written: a directory, an existing file without
    `force`, a suffix not in `suffixes` (when given: the format is the suffix's), or a place where no file can
    be created (tried for real, then removed). None is no output."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise PrumergeError(f"{path} is a directory; a file is needed")
    if suffixes and path.suffix.lower() not in suffixes:
        raise PrumergeError(f"{path} should end in {' or '.join(suffixes)}: the suffix says the file's format")
    if path.exists() and not force:
        raise PrumergeError(f"{path} already exists; pass --force to replace it")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".prumerge-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PrumergeError(f"cannot write {path}: {exc.strerror} in {parent}") from None


def check_output(target: str | Path, force: bool = False) -> Path:
    """Refuse, before any work, an output directory that cannot be written: an existing one without `force`, a
    file, the current directory or one that contains it, or a place where no directory can be created (tried
    for real, then removed)."""
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise PrumergeError(f"refusing to write to {target}: it is the current directory or contains it")
    if target.exists() and not target.is_dir():
        raise PrumergeError(f"{target} is a file; the output must be a directory")
    if target.exists() and not force:
        raise PrumergeError(f"{target} already exists; pass --force to replace it")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrumergeError(f"cannot create {target}: {parent} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prumerge-probe.", dir=parent))
    except OSError as exc:
        raise PrumergeError(f"cannot create {target}: {exc.strerror} in {parent}") from None
    return target


def usual_permissions(tree: Path) -> None:
    """Give every file and directory under `tree` the usual permissions (some writers, e.g. safetensors, create
    private files)."""
    mask = _umask()
    for path in tree.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `target` only if the block succeeds.

    `target` is checked as `check_output` does; on failure nothing is left behind.
    """
    target = check_output(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        usual_permissions(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            try:
                os.replace(target, old / "x")
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / "x", target)  # the previous output stays as it was
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
