"""Which files a pack contains: git's own selection inside a work tree, the same .gitignore
semantics outside it, both narrowed by `.dsv4ignore` files and --include/--exclude globs.

Only names and file types are looked at here; contents belong to read.py.

Symlinks are listed the way git lists them: as entries of their own, never descended into,
so a symlink loop cannot hang the walk and nothing outside SOURCE is ever traversed. Whether
a symlink's target may be read (a regular file inside SOURCE) is decided by read.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.errors import IngestError, SourceNotFound, SourcePermissionDenied
from ingest.gitpatterns import IgnoreRules, regular_file
from ingest.types import SelectOptions, Selection

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

DSV4IGNORE = ".dsv4ignore"
GITIGNORE = ".gitignore"
GITLINK_MODE = "160000"


def _globs(patterns: tuple[str, ...]) -> GitIgnoreSpec | None:
    """--include/--exclude globs match whole paths relative to SOURCE, which is what
    pathspec's GitIgnoreSpec is built for (imported only when there are globs)."""
    if not patterns:
        return None
    from pathspec import GitIgnoreSpec

    return GitIgnoreSpec.from_lines(list(patterns))


# --------------------------------------------------------------------------- entry point


def select(source: Path, options: SelectOptions = SelectOptions()) -> Selection:
    """The files under SOURCE that a pack should contain, relative to SOURCE, byte-wise sorted."""
    source = Path(source)
    if not os.path.lexists(source):
        raise SourceNotFound(f"no such file or directory: {source}",
                             hint="check the path; use '-' to read from stdin")
    root = source.resolve()
    if not root.exists():
        raise SourceNotFound(f"{source} is a broken symlink",
                             hint="point SOURCE at an existing file or directory")
    if not root.is_dir():
        return _select_single_file(root, options)
    if not os.access(root, os.R_OK | os.X_OK):
        raise SourcePermissionDenied(f"permission denied: {source}",
                                     hint="check the directory's permissions")

    warnings: list[str] = []
    listing = _git_listing(root, options, warnings) if options.use_git else None
    if listing is None:
        listing = _walk(root, options, warnings)

    paths, submodules = _narrow(listing, options, warnings)
    untracked = frozenset(p for p in paths if p in listing.untracked)
    return Selection(
        root=root,
        paths=paths,
        submodules=submodules,
        git_root=listing.git_root,
        git_prefix=listing.git_prefix,
        untracked=untracked,
        warnings=warnings,
        recursed_submodules=sorted(listing.recursed, key=os.fsencode),
    )


@dataclass
class _Listing:
    """What git (or the walk) lets through, before .dsv4ignore and globs."""

    files: list[str] = field(default_factory=list)
    submodules: list[str] = field(default_factory=list)
    recursed: list[str] = field(default_factory=list)
    untracked: set[str] = field(default_factory=set)
    git_root: Path | None = None
    git_prefix: str = ""
    walked: bool = False
    rules_prefix: str = ""          # .dsv4ignore rules match rules_prefix + path


def _narrow(listing: _Listing, options: SelectOptions,
            warnings: list[str]) -> tuple[list[str], list[str]]:
    """Apply .dsv4ignore files and --include/--exclude; unique, byte-wise sorted."""
    # the walk applied .dsv4ignore on its way down; git mode looks the files up now
    rules = None if listing.walked else _find_dsv4ignore(listing, warnings)
    includes, excludes = _globs(options.includes), _globs(options.excludes)
    parents: dict[str, bool] = {}
    prefix = listing.rules_prefix

    def keep(path: str, is_dir: bool) -> bool:
        if rules and rules.ignores_with_parents(prefix + path, is_dir, parents):
            return False
        candidate = path + "/" if is_dir else path
        if excludes is not None and excludes.match_file(candidate):
            return False
        if includes is not None and not includes.match_file(candidate):
            return False
        return True

    paths = sorted({p for p in listing.files if keep(p, False)}, key=os.fsencode)
    submodules = sorted({s for s in listing.submodules if keep(s, True)}, key=os.fsencode)
    return paths, submodules


def _find_dsv4ignore(listing: _Listing, warnings: list[str]) -> IgnoreRules:
    """Look up .dsv4ignore in every directory holding a selected file, and in the directories
    between the git work tree root and SOURCE (they apply to SOURCE too)."""
    rules = IgnoreRules()
    base = listing.git_root
    prefix = listing.rules_prefix
    assert base is not None
    directories = {""}
    for path in (*listing.files, *listing.submodules):
        full = prefix + path
        while "/" in full:
            full = full.rpartition("/")[0]
            if full in directories:
                break
            directories.add(full)
    ancestors = prefix.rstrip("/")
    while ancestors:
        directories.add(ancestors)
        ancestors = ancestors.rpartition("/")[0]
    for directory in sorted(directories):
        candidate = os.path.join(base, directory, DSV4IGNORE)
        if regular_file(candidate):
            rules.add_file(directory + "/" if directory else "", candidate, warnings)
    return rules


def _select_single_file(path: Path, options: SelectOptions) -> Selection:
    """SOURCE names one file: that file is the selection, whatever the ignore rules say."""
    root = path.parent
    selection = Selection(root=root, paths=[path.name])
    if not options.use_git:
        return selection
    repo_root = _git_work_tree(root)
    if repo_root is None:
        return selection
    selection.git_root = repo_root
    selection.git_prefix = _prefix(root, repo_root)
    try:
        tracked = _git_z(root, ["ls-files", "-z", "--cached", "--", path.name])
    except IngestError as error:
        selection.warnings.append(str(error))
        tracked = []
    if path.name not in tracked:
        selection.untracked = frozenset({path.name})
    return selection


# --------------------------------------------------------------------------- inside git


def _git_work_tree(directory: Path) -> Path | None:
    """The root of the git work tree holding `directory`, or None (not in git, bare
    repository, or no git executable)."""
    try:
        import git  # gitpython refuses to import when no git executable is found
    except ImportError:
        return None
    try:
        repo = git.Repo(directory, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    try:
        if repo.bare or repo.working_tree_dir is None:
            return None
        return Path(repo.working_tree_dir).resolve()
    finally:
        repo.close()


def _prefix(directory: Path, work_tree: Path) -> str:
    relative = directory.relative_to(work_tree).as_posix()
    return "" if relative == "." else relative + "/"


def _git_z(directory: Path, arguments: list[str], warnings: list[str] | None = None) -> list[str]:
    """Run git in `directory` and split its NUL-terminated output into names; git's own
    warnings (an unreadable directory, say) go to `warnings`."""
    import git

    command = [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", "-c", "core.quotepath=off", *arguments]
    try:
        _, output, errors = git.Git(str(directory)).execute(
            command, with_extended_output=True, stdout_as_string=False)
    except git.GitCommandError as error:
        detail = error.stderr.strip() if isinstance(error.stderr, str) else str(error.stderr)
        raise IngestError(f"git {arguments[0]} failed in {directory}: {detail}") from error
    assert isinstance(output, bytes)
    if warnings is not None and errors:
        text = errors.decode("utf-8", "replace") if isinstance(errors, bytes) else errors
        warnings.extend(line.removeprefix("warning: ") for line in text.splitlines() if line)
    return [os.fsdecode(name) for name in output.split(b"\0") if name]


def _git_listing(root: Path, options: SelectOptions, warnings: list[str]) -> _Listing | None:
    work_tree = _git_work_tree(root)
    if work_tree is None:
        return None
    try:
        prefix = _prefix(root, work_tree)
    except ValueError:              # GIT_WORK_TREE names another directory
        return None
    if ".git" in prefix.split("/"):  # SOURCE is git's own metadata: not part of the work tree
        return None
    listing = _Listing(git_root=work_tree, git_prefix=prefix)
    listing.rules_prefix = listing.git_prefix
    try:
        _git_collect(root, "", options, listing, warnings)
    except IngestError as error:
        warnings.append(f"{error}; selected files by walking the directory instead")
        return None
    if not listing.files and not listing.submodules and _ignored_by_git(root):
        # git lists nothing inside an ignored directory, but naming it is a clear request
        warnings.append(f"{listing.git_prefix or './'} is ignored by git; selected its "
                        "files by walking it with its own .gitignore files")
        return None
    return listing


def _ignored_by_git(directory: Path) -> bool:
    import git

    command = [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", "check-ignore", "-q", "."]
    status, _, _ = git.Git(str(directory)).execute(command, with_extended_output=True,
                                                   with_exceptions=False)
    return status == 0


def _git_collect(directory: Path, prefix: str, options: SelectOptions, listing: _Listing,
                 warnings: list[str]) -> None:
    """Add what git selects in `directory` (a work tree, or a subdirectory of one), with
    paths prefixed by `prefix`; descend into submodules when asked."""
    # One call lists everything: `-t` tags untracked entries "? path", index entries
    # "H <mode> <object> <stage>\tpath" (S for skip-worktree, M for unmerged, ...), and, after
    # its index entry, "R ..." for a tracked file missing from the work tree (git's own lstat,
    # so no second stat of every file here). git never stats skip-worktree entries: we do.
    records = _git_z(directory, ["ls-files", "-z", "-t", "--stage", "--cached", "--others", "--deleted",
                                 "--exclude-standard"], warnings)
    gitlinks: list[str] = []
    nested_repositories: list[str] = []
    tracked: list[str] = []
    deleted: set[str] = set()
    base = os.path.join(directory, "")
    for record in records:
        tag = record[:2]
        if tag == "? ":
            path = record[2:]
            if path.endswith("/"):     # an untracked nested repository: git does not look inside
                nested_repositories.append(path.rstrip("/"))
            else:
                listing.files.append(prefix + path)
                listing.untracked.add(prefix + path)
            continue
        meta, _, path = record[2:].partition("\t")
        if meta.startswith(GITLINK_MODE + " "):
            if tag != "R ":
                gitlinks.append(path)
        elif tag == "R ":
            deleted.add(path)
        elif tag != "S " or os.path.lexists(base + path):
            tracked.append(path)
    listing.files.extend(prefix + path for path in tracked if path not in deleted)
    for path in dict.fromkeys(gitlinks + nested_repositories):
        nested = directory / path
        if not options.recurse_submodules:
            listing.submodules.append(prefix + path)
        elif os.path.lexists(nested / ".git"):
            listing.recursed.append(prefix + path)
            _git_collect(nested, prefix + path + "/", options, listing, warnings)
        else:
            listing.submodules.append(prefix + path)
            warnings.append(f"submodule {prefix + path} is not checked out; listed only "
                            "(run `git submodule update --init`)")


# --------------------------------------------------------------------------- outside git


def _walk(root: Path, options: SelectOptions, warnings: list[str]) -> _Listing:
    """Walk the tree applying every .gitignore (and .dsv4ignore) relative to its directory.

    Ignored directories are not entered, `.git` entries are skipped, symlinks are listed as
    entries and never descended, special files (fifos, sockets, devices) are left out, as git
    does. A directory holding a `.git` entry is a nested repository: listed as a submodule,
    walked only with `recurse_submodules`, and then without the rules from above it.
    """
    listing = _Listing(walked=True)
    gitignore, dsv4 = IgnoreRules(), IgnoreRules()
    top = str(root)
    pending = [""]
    while pending:
        relative = pending.pop()
        directory = os.path.join(top, relative) if relative else top
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as error:
            warnings.append(f"skipped directory {relative or './'}: {error.strerror or error}")
            continue
        for entry in entries:
            if entry.name == GITIGNORE and entry.is_file(follow_symlinks=False):
                gitignore.add_file(relative, entry.path, warnings)
            elif entry.name == DSV4IGNORE and entry.is_file(follow_symlinks=False):
                dsv4.add_file(relative, entry.path, warnings)
        for entry in entries:
            name = entry.name
            if name == ".git":
                continue
            path = relative + name
            try:
                if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                    if not gitignore.ignores(path, False) and not dsv4.ignores(path, False):
                        listing.files.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    if gitignore.ignores(path, True) or dsv4.ignores(path, True):
                        continue
                    if os.path.lexists(os.path.join(entry.path, ".git")):
                        if not options.recurse_submodules:
                            listing.submodules.append(path)
                            continue
                        listing.recursed.append(path)
                        gitignore.boundaries.add(path + "/")
                    pending.append(path + "/")
            except OSError as error:
                warnings.append(f"skipped {path}: {error.strerror or error}")
    return listing
