"""Plain data passed between the ingest stages: select -> read -> order -> budget -> render.

Paths are always relative, with '/' separators, so that a pack never depends on where the
repository lives or on the operating system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["full", "reduced", "listed"]


@dataclass(frozen=True)
class SelectOptions:
    includes: tuple[str, ...] = ()          # --include globs (gitignore-style); empty = all
    excludes: tuple[str, ...] = ()          # --exclude globs (gitignore-style)
    recurse_submodules: bool = False
    use_git: bool = True                    # False: ignore git even inside a work tree


@dataclass
class Selection:
    """What the ignore rules let through, before any content filter."""

    root: Path                              # the SOURCE directory (or the file's parent)
    paths: list[str]                        # relative to root, '/' separators
    submodules: list[str] = field(default_factory=list)   # listed, not descended into
    git_root: Path | None = None            # work tree root when inside git
    git_prefix: str = ""                    # root relative to git_root ('' or 'sub/dir/')
    untracked: frozenset[str] = frozenset()  # subset of paths that git does not track
    warnings: list[str] = field(default_factory=list)
    # submodules (or nested repositories) whose files are in `paths` (--recurse-submodules);
    # their files are tracked by their own repository, not by git_root's history
    recursed_submodules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadOptions:
    max_file_bytes: int = 1 << 20           # per-file cap; larger files are listed
    default_filters: bool = True            # False: keep noise (lock files, minified, ...)
    # files up to this size are offered to the document converter (PDF manuals are often
    # larger than max_file_bytes); the converted text must still fit max_file_bytes
    max_document_bytes: int = 64 << 20


@dataclass
class Document:
    """One file (or converted manual) ready to render."""

    path: str                               # display path, '/' separators
    text: str | None                        # the body to inline; None when only listed
    status: Status = "full"
    reason: str = ""                        # why it is listed or reduced ("binary", "lock file", ...)
    size: int = 0                           # bytes on disk
    digest: str = ""                        # sha256 hex of the bytes on disk
    warnings: list[str] = field(default_factory=list)
