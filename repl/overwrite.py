"""Where ``save`` and ``record start`` may write: never over the open snapshot, its side
files or a non-regular file, and over any other existing file only with ``--force``."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import CommandError
from .session import Session

__all__ = ["check_output_path", "snapshot_files"]


def snapshot_files(session: Session) -> set[Path]:
    """The open snapshot's document and every side file it names, resolved."""
    files: set[Path] = set()
    if session.source is not None:
        files.add(Path(session.source).resolve())
    snap = session.context.snapshot
    for i, region in enumerate(getattr(snap, "memory", ())):
        name = getattr(region, "path", "")
        if isinstance(name, str) and name:
            files.add(_resolved(snap, name, f"memory[{i}].file"))
    for i, src in enumerate(snap.symbols):
        if src.kind != "inline" and isinstance(src.path, str) and src.path:
            files.add(_resolved(snap, src.path, f"symbols[{i}].path"))
    return files


def _resolved(snap: object, name: str, where: str) -> Path:
    try:
        return Path(snap.resolve(name, where)).resolve()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an unresolvable name cannot be overwritten by us
        return Path(name).resolve()


def check_output_path(
    session: Session, path: Path, *, force: bool, replacing: Iterable[Path] = ()
) -> None:
    """Refuse (one line) to write ``path`` over the snapshot's files, a non-regular file,
    or an existing file without ``force``; ``replacing`` are files this write owns.

    :raises CommandError: the write is refused.
    """
    resolved = path.resolve()
    if resolved in snapshot_files(session):
        raise CommandError(f"{path}: is part of the open snapshot; refusing to overwrite it")
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CommandError(f"{path}: cannot check it: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CommandError(f"{path}: not a regular file; refusing to write to it")
    owned = {p.resolve() for p in replacing}
    if not force and resolved not in owned:
        raise CommandError(f"{path}: exists; give --force to overwrite it")
