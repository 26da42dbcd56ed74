"""Pack order: the order in which files first appeared in the history, so the pack stays stable.

A plain path sort puts a new file wherever its name falls and shifts every later file; ordering
by first appearance puts new files at the end. Inside git the key of a path is
(group, position, path):

- group 0: paths with an add record on HEAD's first-parent chain, position = the index of that
  record. Merges count as the commit that brings the files into the first-parent line, so the
  order of an extended history is the old order plus new paths appended: an incremental update
  from a cached ancestor gives exactly what a full recomputation gives.
- group 1: tracked paths without an add record (shallow clones, staged but uncommitted files),
- group 2: untracked paths.
Ties (several paths in one commit, and groups 1 and 2) go by byte-wise path. A file inside a
submodule takes its gitlink's place. Outside git the order is byte-wise path order.

The history costs one `git log` over the whole repository; it is cached per HEAD commit under
`<cache_dir>/history/<repo id>/<HEAD>.json` and extended from a cached ancestor with `OLD..HEAD`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ingest.disk_cache import load_json, prune_oldest, save_json
from ingest.types import Selection

_FORMAT_VERSION = 1
_COMMIT_MARKER = "\x01dsv4-commit\x01"
_COMMIT_FORMAT = "%x01dsv4-commit%x01"     # git spells the marker bytes this way
_KEEP_PER_REPO = 8
# Settings that would change what `git log` prints; pinned so every machine sees the same list.
_GIT_CONFIG = ("-c", "log.showRoot=true", "-c", "log.showSignature=false", "-c", "core.quotePath=false")


def pack_order(selection: Selection, cache_dir: Path | None = None) -> list[str]:
    """All of `selection.paths` and `selection.submodules`, in pack order (relative to root)."""
    everything = sorted(set(selection.paths) | set(selection.submodules), key=_byte_key)
    if selection.git_root is None:
        return everything
    history = first_appearance(selection.git_root, cache_dir)
    position = {path: index for index, path in enumerate(history)}
    prefix = selection.git_prefix

    def key(path: str) -> tuple[int, int, str]:
        if path in selection.untracked:
            return (2, 0, path)
        found = _position_of(prefix + path, position)
        if found is None:
            return (1, 0, path)
        return (0, found, path)

    return sorted(everything, key=key)


def _position_of(repo_path: str, position: dict[str, int]) -> int | None:
    found = position.get(repo_path)
    if found is not None:
        return found
    # A file inside a submodule: the superproject recorded only the gitlink.
    parent = repo_path.rpartition("/")[0]
    while parent:
        found = position.get(parent)
        if found is not None:
            return found
        parent = parent.rpartition("/")[0]
    return None


def _byte_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def first_appearance(git_root: Path, cache_dir: Path | None = None) -> list[str]:
    """Paths (relative to the work tree root) in the order they were first added on HEAD."""
    import git
    from git.refs.symbolic import SymbolicReference

    repo = git.Repo(git_root)
    try:
        # reads the refs files only; `repo.head.commit` would start a `git cat-file` process
        head = SymbolicReference.dereference_recursive(repo, "HEAD")
    except ValueError:  # no commit yet: nothing has a history
        return []
    folder = _history_folder(repo, cache_dir)
    if folder is not None:
        cached = _load(folder / f"{head}.json", head)
        if cached is not None:
            return cached
    paths = _extend_from_cached_ancestor(repo, head, folder)
    if paths is None:
        paths = _added_paths(repo, head, since=None, known=[])
    if folder is not None:
        save_json(folder / f"{head}.json", {"version": _FORMAT_VERSION, "head": head, "paths": paths})
        prune_oldest(folder, _KEEP_PER_REPO)
    return paths


def _history_folder(repo, cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    common = str(Path(repo.common_dir).resolve())
    repo_id = hashlib.sha256(common.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return Path(cache_dir) / "history" / repo_id


def _load(path: Path, head: str) -> list[str] | None:
    data = load_json(path)
    if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION or data.get("head") != head:
        return None
    paths = data.get("paths")
    return paths if isinstance(paths, list) else None


def _extend_from_cached_ancestor(repo, head: str, folder: Path | None) -> list[str] | None:
    if folder is None:
        return None
    try:
        cached = {p.stem: p for p in folder.glob("*.json")}
    except OSError:
        return None
    if not cached:
        return None
    # Only an ancestor on the first-parent chain extends by appending.
    chain = repo.git.execute(["git", *_GIT_CONFIG, "rev-list", "--first-parent", head]).split()
    for commit in chain:
        if commit in cached:
            known = _load(cached[commit], commit)
            if known is not None:
                return _added_paths(repo, head, since=commit, known=known)
    return None


def _added_paths(repo, head: str, *, since: str | None, known: list[str]) -> list[str]:
    """`known` followed by the paths first added in (since, head], in first-parent order."""
    from git.exc import GitCommandError

    revision = f"{since}..{head}" if since else head
    command = [
        "git", *_GIT_CONFIG, "log", "-z", "--reverse", "--first-parent", "--diff-merges=first-parent",
        "--diff-filter=A", "--no-renames", "--name-only", f"--format={_COMMIT_FORMAT}", revision, "--",
    ]
    try:
        raw = repo.git.execute(command, stdout_as_string=False)
    except GitCommandError:
        # git before 2.31 spells "merges as their first-parent diff" `-m --first-parent`
        command[command.index("--diff-merges=first-parent")] = "-m"
        raw = repo.git.execute(command, stdout_as_string=False)
    seen = set(known)
    paths = list(known)
    for commit_paths in _split_commits(raw.decode("utf-8", "surrogateescape")):
        fresh = sorted({p for p in commit_paths if p not in seen}, key=_byte_key)
        seen.update(fresh)
        paths.extend(fresh)
    return paths


def _split_commits(output: str) -> list[list[str]]:
    """`git log -z --name-only` output: marker NUL '\\n'path NUL path NUL ... per commit."""
    commits: list[list[str]] = []
    for field in output.split("\0"):
        if field == _COMMIT_MARKER or field == "\n" + _COMMIT_MARKER:
            commits.append([])
            continue
        if field.startswith("\n"):
            field = field[1:]
        if field and commits:
            commits[-1].append(field)
    return commits
