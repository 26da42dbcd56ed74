"""File selection: git's own answer inside a work tree, the same rules outside it.

Every expected set below is written out by hand from gitignore's documented semantics, so
a test fails if either git mode or the pathspec walk drifts from them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import git
import pytest

from ingest.errors import SourceNotFound
from ingest.read import read_document
from ingest.select import select
from ingest.types import ReadOptions, SelectOptions

WALK = SelectOptions(use_git=False)


@pytest.fixture(autouse=True)
def git_identity(tmp_path_factory, monkeypatch) -> Path:
    """A private global git config: an identity to commit with, nothing from the machine."""
    config = tmp_path_factory.mktemp("gitconfig") / "config"
    config.write_text("[user]\n\tname = Test\n\temail = test@example.com\n"
                      "[init]\n\tdefaultBranch = main\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return config


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def init_repo(root: Path, files: dict[str, str | bytes] | None = None,
              commit: bool = True) -> git.Repo:
    root.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(root)
    write(root, files or {})
    if commit:
        repo.git.add(A=True)
        repo.git.commit("-q", "--allow-empty", "-m", "initial")
    return repo


# A tree exercising the gitignore rules: nested files at three levels, negations, anchored
# and directory-only patterns, '**', escapes, and a negation that cannot re-include a file
# below an excluded directory.
COMPLEX_TREE: dict[str, str | bytes] = {
    ".gitignore": "\n".join([
        "# comment",
        "*.log",
        "!keep.log",
        "/build/",
        "tmp/",
        "!tmp/rescued.txt",
        "docs/**/draft*.md",
        "secret.txt",
        "cache",
        "*.tmp",
        "!important.tmp",
        "logs/*",
        "!logs/keep/",
        "foo/**/bar.txt",
        "\\#hash.txt",
        "trailing.txt   ",
        "",
    ]),
    "README.md": "readme\n",
    "a.log": "x", "keep.log": "x", "src/x.log": "x", "src/keep.log": "x",
    "build/out.o": "x", "src/build/gen.py": "x",
    "tmp/t.txt": "x", "tmp/rescued.txt": "x", "src/tmp/t.txt": "x", "src/other/tmp": "file named tmp",
    "docs/draft1.md": "x", "docs/a/b/draft2.md": "x", "docs/final.md": "x",
    "secret.txt": "x",
    "cache/x.txt": "x", "src/cache": "x",
    "x.tmp": "x", "important.tmp": "x",
    "logs/a.txt": "x", "logs/keep/b.txt": "x",
    "foo/bar.txt": "x", "foo/x/y/bar.txt": "x", "foo/baz.txt": "x",
    "#hash.txt": "x", "trailing.txt": "x",
    "src/.gitignore": "!secret.txt\n/only_here.txt\ngenerated/\n",
    "src/secret.txt": "x", "src/deeper/secret.txt": "x",
    "src/only_here.txt": "x", "src/deeper/only_here.txt": "x",
    "src/generated/g.py": "x", "generated/top.py": "x",
    "src/deeper/.gitignore": "*.py\n!keep.py\n",
    "src/deeper/a.py": "x", "src/deeper/keep.py": "x", "src/deeper/sub/b.py": "x",
    "src/main.py": "x",
}
COMPLEX_EXPECTED = sorted([
    ".gitignore", "README.md", "keep.log", "src/keep.log", "src/build/gen.py",
    "src/other/tmp", "docs/final.md", "important.tmp", "logs/keep/b.txt", "foo/baz.txt",
    "src/.gitignore", "src/secret.txt", "src/deeper/secret.txt", "src/deeper/only_here.txt",
    "generated/top.py", "src/deeper/.gitignore", "src/deeper/keep.py", "src/main.py",
])


@pytest.mark.parametrize("committed", [True, False], ids=["tracked", "untracked"])
def test_git_mode_follows_every_gitignore_rule(tmp_path: Path, committed: bool) -> None:
    init_repo(tmp_path, COMPLEX_TREE, commit=committed)
    selection = select(tmp_path)
    assert selection.paths == COMPLEX_EXPECTED
    assert selection.git_root == tmp_path.resolve()
    assert selection.git_prefix == ""
    assert selection.untracked == (frozenset() if committed else frozenset(COMPLEX_EXPECTED))


def test_walk_gives_the_same_set_as_git(tmp_path: Path) -> None:
    init_repo(tmp_path, COMPLEX_TREE)
    by_git = select(tmp_path)
    by_walk = select(tmp_path, WALK)
    assert by_walk.paths == by_git.paths == COMPLEX_EXPECTED
    assert by_walk.git_root is None and by_walk.untracked == frozenset()


def test_walk_outside_git(tmp_path: Path) -> None:
    write(tmp_path, COMPLEX_TREE)
    selection = select(tmp_path)
    assert selection.paths == COMPLEX_EXPECTED
    assert selection.git_root is None


def test_tracked_file_matching_gitignore_stays_selected(tmp_path: Path) -> None:
    repo = init_repo(tmp_path, {"app.log": "tracked before it was ignored\n"})
    (tmp_path / ".gitignore").write_text("*.log\n")
    repo.git.add(".gitignore")
    repo.git.commit("-q", "-m", "ignore logs")
    (tmp_path / "new.log").write_text("untracked\n")
    assert select(tmp_path).paths == [".gitignore", "app.log"]


def test_info_exclude_and_core_excludes_file(tmp_path: Path, git_identity: Path) -> None:
    excludes = tmp_path / "global-excludes"
    excludes.write_text("*.globalignored\n")
    with git_identity.open("a") as config:
        config.write(f"[core]\n\texcludesFile = {excludes}\n")
    repo_dir = tmp_path / "repo"
    init_repo(repo_dir, {"a.py": "x"})
    (repo_dir / ".git" / "info").mkdir(exist_ok=True)
    (repo_dir / ".git" / "info" / "exclude").write_text("local-only/\n")
    write(repo_dir, {"x.globalignored": "x", "local-only/notes.txt": "x", "b.py": "x"})
    selection = select(repo_dir)
    assert selection.paths == ["a.py", "b.py"]
    assert selection.untracked == {"b.py"}


def test_deleted_tracked_file_is_skipped(tmp_path: Path) -> None:
    init_repo(tmp_path, {"a.py": "x", "gone.py": "x"})
    (tmp_path / "gone.py").unlink()
    assert select(tmp_path).paths == ["a.py"]


def test_skip_worktree_and_unmerged_entries(tmp_path: Path) -> None:
    """git stats neither skip-worktree entries (a sparse checkout leaves them out) nor lists
    them as deleted: those on disk stay, those missing go; a gone directory takes its files."""
    repo = init_repo(tmp_path, {"a.py": "x", "sparse/kept.py": "x", "sparse/gone.py": "x", "dir/f.py": "x",
                                "dir/g.py": "x"})
    repo.git.update_index("--skip-worktree", "sparse/kept.py", "sparse/gone.py")
    (tmp_path / "sparse" / "gone.py").unlink()
    import shutil

    shutil.rmtree(tmp_path / "dir")
    (tmp_path / "dir").write_text("a file where the directory was\n")
    assert select(tmp_path).paths == ["a.py", "dir", "sparse/kept.py"]


def test_source_is_a_subdirectory(tmp_path: Path) -> None:
    init_repo(tmp_path, {
        ".gitignore": "*.gen\n/sub/anchored.txt\n",
        ".dsv4ignore": "*.skip\n",
        "top.py": "x",
        "sub/a.py": "x", "sub/b.gen": "x", "sub/anchored.txt": "x", "sub/c.skip": "x",
        "sub/deep/d.py": "x",
    })
    write(tmp_path, {"sub/untracked.py": "x", "sub/untracked.gen": "x"})
    selection = select(tmp_path / "sub")
    assert selection.paths == ["a.py", "deep/d.py", "untracked.py"]
    assert selection.root == (tmp_path / "sub").resolve()
    assert selection.git_root == tmp_path.resolve()
    assert selection.git_prefix == "sub/"
    assert selection.untracked == {"untracked.py"}


def test_odd_file_names_survive(tmp_path: Path) -> None:
    names = ["sp ace.txt", "ünïcödé.txt", "tab\there.txt", 'quote".txt', "new\nline.txt",
             "back\\slash.txt"]
    init_repo(tmp_path, {name: "x" for name in names})
    expected = sorted(names, key=os.fsencode)
    assert select(tmp_path).paths == expected
    assert select(tmp_path, WALK).paths == expected


def test_order_is_bytewise_and_unique(tmp_path: Path) -> None:
    init_repo(tmp_path, {"b.py": "x", "B.py": "x", "a/z.py": "x", "a.py": "x", "é.py": "x"})
    paths = select(tmp_path).paths
    assert paths == ["B.py", "a.py", "a/z.py", "b.py", "é.py"]
    assert select(tmp_path, WALK).paths == paths


# --------------------------------------------------------------------------- submodules


def make_superproject(tmp_path: Path) -> Path:
    library = tmp_path / "library"
    init_repo(library, {"lib.py": "x", ".gitignore": "*.o\n", "inner/deep.py": "x"})
    main = tmp_path / "main"
    repo = init_repo(main, {"app.py": "x"})
    repo.git.execute(["git", "-c", "protocol.file.allow=always", "submodule", "add", "-q",
                      str(library), "vendor/library"])
    repo.git.commit("-q", "-m", "add submodule")
    write(main, {"vendor/library/untracked.py": "x", "vendor/library/obj.o": "x"})
    return main


def test_submodule_is_listed_not_descended(tmp_path: Path) -> None:
    main = make_superproject(tmp_path)
    selection = select(main)
    assert selection.paths == [".gitmodules", "app.py"]
    assert selection.submodules == ["vendor/library"]
    assert selection.recursed_submodules == []


def test_submodule_recursed_on_request(tmp_path: Path) -> None:
    main = make_superproject(tmp_path)
    selection = select(main, SelectOptions(recurse_submodules=True))
    # untracked files inside the submodule count too; its own .gitignore applies
    assert selection.paths == [".gitmodules", "app.py", "vendor/library/.gitignore",
                               "vendor/library/inner/deep.py", "vendor/library/lib.py",
                               "vendor/library/untracked.py"]
    assert selection.submodules == []
    assert selection.recursed_submodules == ["vendor/library"]
    assert selection.untracked == {"vendor/library/untracked.py"}


def test_walk_treats_nested_repositories_like_submodules(tmp_path: Path) -> None:
    main = make_superproject(tmp_path)
    walked = select(main, WALK)
    assert walked.paths == [".gitmodules", "app.py"]
    assert walked.submodules == ["vendor/library"]
    recursed = select(main, SelectOptions(use_git=False, recurse_submodules=True))
    assert recursed.paths == select(main, SelectOptions(recurse_submodules=True)).paths


def test_untracked_nested_repository_is_listed(tmp_path: Path) -> None:
    init_repo(tmp_path / "outer", {"a.py": "x"})
    init_repo(tmp_path / "outer" / "inner", {"b.py": "x"})
    selection = select(tmp_path / "outer")
    assert selection.paths == ["a.py"]
    assert selection.submodules == ["inner"]
    recursed = select(tmp_path / "outer", SelectOptions(recurse_submodules=True))
    assert recursed.paths == ["a.py", "inner/b.py"]


# --------------------------------------------------------------------------- symlinks


def run_with_deadline(function, seconds: float = 20.0):
    """Call `function` in a thread; fail instead of hanging the suite."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "selection did not finish (symlink loop?)"
    return result[0]


def test_symlink_loops_do_not_hang_the_walk(tmp_path: Path) -> None:
    write(tmp_path, {"d/file.txt": "x"})
    (tmp_path / "d" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "d" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "ping").symlink_to("pong")
    (tmp_path / "pong").symlink_to("ping")
    selection = run_with_deadline(lambda: select(tmp_path))
    # symlinks are listed as entries, the way git lists them, and never descended
    assert selection.paths == ["d/file.txt", "d/self", "d/up", "ping", "pong"]
    reasons = {p: read_document(selection.root, p, ReadOptions()).reason for p in selection.paths}
    assert reasons == {"d/file.txt": "", "d/self": "symlink to a directory",
                       "d/up": "symlink to a directory", "ping": "broken symlink",
                       "pong": "broken symlink"}


def test_symlinks_out_of_source_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, {"secret.txt": "TOP SECRET\n", "dir/more.txt": "MORE SECRET\n"})
    source = tmp_path / "source"
    write(source, {"inside.txt": "inside\n"})
    (source / "file-link").symlink_to(outside / "secret.txt")
    (source / "dir-link").symlink_to(outside / "dir", target_is_directory=True)
    (source / "relative-link").symlink_to("../outside/secret.txt")
    (source / "inner-link").symlink_to("inside.txt")
    for options in (SelectOptions(), WALK):
        selection = select(source, options)
        assert selection.paths == ["dir-link", "file-link", "inner-link", "inside.txt",
                                   "relative-link"]
        documents = {p: read_document(selection.root, p, ReadOptions()) for p in selection.paths}
        assert documents["inner-link"].text == "inside\n"
        for name in ("dir-link", "file-link", "relative-link"):
            assert documents[name].status == "listed"
            assert documents[name].reason == "symlink outside SOURCE"
            assert documents[name].text is None and documents[name].digest == ""


def test_tracked_symlink_pointing_out_of_a_subdirectory_source(tmp_path: Path) -> None:
    init_repo(tmp_path, {"private.txt": "private\n", "sub/a.txt": "a\n"})
    (tmp_path / "sub" / "link").symlink_to("../private.txt")
    repo = git.Repo(tmp_path)
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "link")
    selection = select(tmp_path / "sub")
    assert selection.paths == ["a.txt", "link"]
    assert read_document(selection.root, "link", ReadOptions()).reason == "symlink outside SOURCE"


# --------------------------------------------------------------------------- narrowing


def test_dsv4ignore_narrows_at_every_level(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        ".gitignore": "*.log\n",
        ".dsv4ignore": "fixtures/\n*.snap\n!keep.snap\n!*.log\n",
        "a.py": "x", "a.snap": "x", "keep.snap": "x", "x.log": "x",
        "fixtures/big.json": "x",
        "pkg/.dsv4ignore": "/local.py\nkeep.snap\n",
        "pkg/local.py": "x", "pkg/deep/local.py": "x", "pkg/keep.snap": "x", "pkg/m.py": "x",
    }
    expected = [".dsv4ignore", ".gitignore", "a.py", "keep.snap", "pkg/.dsv4ignore",
                "pkg/deep/local.py", "pkg/m.py"]
    init_repo(tmp_path / "git", files)
    write(tmp_path / "plain", files)
    assert select(tmp_path / "git").paths == expected
    assert select(tmp_path / "git", WALK).paths == expected
    assert select(tmp_path / "plain").paths == expected


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        "src/a.py": "x", "src/b.ts": "x", "src/gen/c.py": "x", "tests/test_a.py": "x",
        "README.md": "x", "docs/x.md": "x",
    }
    init_repo(tmp_path, files)
    for mode in (SelectOptions(), WALK):
        narrowed = select(tmp_path, SelectOptions(includes=("*.py", "*.md"),
                                                  excludes=("tests/", "src/gen/"),
                                                  use_git=mode.use_git))
        assert narrowed.paths == ["README.md", "docs/x.md", "src/a.py"]
        anchored = select(tmp_path, SelectOptions(includes=("/src/",), excludes=("*.ts",),
                                                  use_git=mode.use_git))
        assert anchored.paths == ["src/a.py", "src/gen/c.py"]


def test_excludes_apply_to_submodules(tmp_path: Path) -> None:
    main = make_superproject(tmp_path)
    assert select(main, SelectOptions(excludes=("vendor/",))).submodules == []


# --------------------------------------------------------------------------- edges


def test_single_file_source(tmp_path: Path) -> None:
    init_repo(tmp_path, {".gitignore": "*.log\n", "a.py": "x", "notes.log": "x"})
    selection = select(tmp_path / "notes.log")
    assert selection.root == tmp_path.resolve()
    assert selection.paths == ["notes.log"]
    assert selection.untracked == {"notes.log"}
    assert select(tmp_path / "a.py").untracked == frozenset()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert select(plain, WALK).paths == ["plain.txt"]


def test_missing_source_raises_with_hint(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound) as caught:
        select(tmp_path / "nope")
    assert "nope" in str(caught.value)
    assert caught.value.hint


def test_unreadable_directory_is_skipped_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    # tests run as root, where chmod does not deny reading: refuse the scan instead
    write(tmp_path, {"a.py": "x", "locked/b.py": "x", "open/c.py": "x"})
    real_scandir = os.scandir
    locked = str(tmp_path / "locked")

    def scandir(path):
        if os.fspath(path).rstrip("/") == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    selection = select(tmp_path)
    assert selection.paths == ["a.py", "open/c.py"]
    assert selection.warnings == ["skipped directory locked/: Permission denied"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_unreadable_directory_in_git_is_skipped_with_a_warning(tmp_path: Path) -> None:
    init_repo(tmp_path, {"a.py": "x"})
    write(tmp_path, {"locked/b.py": "x"})
    (tmp_path / "locked").chmod(0)
    try:
        selection = select(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert selection.paths == ["a.py"]
    assert any("locked" in warning for warning in selection.warnings)


def test_source_ignored_by_git_is_walked_with_a_warning(tmp_path: Path) -> None:
    init_repo(tmp_path, {".gitignore": "build/\n", "a.py": "x"})
    write(tmp_path, {"build/out/x.txt": "x", "build/out/.gitignore": "*.o\n",
                     "build/out/y.o": "x"})
    selection = select(tmp_path / "build" / "out")
    assert selection.paths == [".gitignore", "x.txt"]
    assert selection.warnings == ["build/out/ is ignored by git; selected its files by "
                                  "walking it with its own .gitignore files"]
    assert select(tmp_path).paths == [".gitignore", "a.py"]


def test_ignore_files_are_not_read_through_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, {"rules": "*.py\n"})
    source = tmp_path / "source"
    write(source, {"a.py": "x", "b.txt": "x"})
    (source / ".gitignore").symlink_to(outside / "rules")
    (source / ".dsv4ignore").symlink_to(outside / "rules")
    assert select(source).paths == [".dsv4ignore", ".gitignore", "a.py", "b.txt"]


def test_names_that_are_not_utf8(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name\n")
    init_repo(tmp_path, {"a.txt": "x"})
    name = os.fsdecode(b"caf\xe9.txt")
    assert select(tmp_path).paths == ["a.txt", name]
    assert select(tmp_path, WALK).paths == ["a.txt", name]
    assert read_document(tmp_path, name, ReadOptions()).text == "latin-1 name\n"


WHITELIST_TREE: dict[str, str | bytes] = {
    # ignore everything, then bring back directories and Python files (a common idiom)
    ".gitignore": "*\n!*/\n!*.py\n!.gitignore\n",
    "a.py": "x", "b.txt": "x", "pkg/c.py": "x", "pkg/d.json": "x",
    "pkg/sub/.gitignore": "!*.json\n[xy].py\n?.md\n\\!bang.py\n",
    "pkg/sub/e.json": "x", "pkg/sub/x.py": "x", "pkg/sub/z.py": "x", "pkg/sub/r.md": "x",
    "pkg/sub/!bang.py": "x", "pkg/sub/bang.py": "x",
}
WHITELIST_EXPECTED = [".gitignore", "a.py", "pkg/c.py", "pkg/sub/.gitignore", "pkg/sub/bang.py",
                      "pkg/sub/e.json", "pkg/sub/z.py"]


def test_whitelist_idiom_and_wildcards_in_both_modes(tmp_path: Path) -> None:
    init_repo(tmp_path, WHITELIST_TREE)
    assert select(tmp_path).paths == WHITELIST_EXPECTED
    assert select(tmp_path, WALK).paths == WHITELIST_EXPECTED


DIFFERENTIAL_FILES = [
    "a.py", "top.py", "sub/top.py", "a/keep", "a/z", "a/x/y/z", "b/q", "x/b/q", "c", "k/c/f",
    "d/m/e", "d/m/n/e", "A.md", "b.md", "x.md", "xa.log", "ab.log", "f*.txt", "fx.txt",
    "!bang", "sp ", "1.txt", "B.txt", "foo-bar", "foobar", "foo/bar", "deep/t",
    "k/deep/keep/u", "k/deep/v", "d/f.txt", "e/g.txt", "sub/k.log", "sub/x/z", "sub/y.log",
    ".hidden/q.py", "k/c.txt",
]


@pytest.mark.parametrize("root_rules,sub_rules", [
    (["*", "!*/", "!*.py"], []),
    (["*.txt", "!d/"], []),
    (["/a/**/z", "b/**", "**/c", "d/*/e"], []),
    (["[a-c]*.md", "[!x]?.log", "f\\*.txt", "\\!bang", "sp\\ "], []),
    (["a/", "!a/keep"], []),
    (["**/deep/**", "!**/deep/keep/**"], []),
    (["*.py", "!/top.py"], ["top.py"]),
    (["*.log", "x"], ["!*.log", "!x/"]),
    (["[[:digit:]]*", "[[:upper:]]*"], []),
    (["foo**bar", "k/*", "!k/c/"], ["/*", "!y.log"]),
])
def test_walk_agrees_with_git(tmp_path: Path, root_rules: list[str],
                              sub_rules: list[str]) -> None:
    """git is the oracle: for each rule set, the pathspec-free walk must select what git does."""
    files: dict[str, str | bytes] = {name: "x" for name in DIFFERENTIAL_FILES}
    files[".gitignore"] = "\n".join(root_rules) + "\n"
    if sub_rules:
        files["sub/.gitignore"] = "\n".join(sub_rules) + "\n"
    init_repo(tmp_path, files, commit=False)
    by_git = select(tmp_path).paths
    assert len(by_git) < len(files)     # the rules did hide something
    assert select(tmp_path, WALK).paths == by_git


def test_ignore_file_with_bom_and_crlf(tmp_path: Path) -> None:
    init_repo(tmp_path, {".gitignore": "\ufeff*.log\r\nbuild/\r\n!keep.log\r\n",
                         "a.log": "x", "keep.log": "x", "build/x": "x", "src.py": "x"},
              commit=False)
    expected = [".gitignore", "keep.log", "src.py"]
    assert select(tmp_path).paths == expected
    assert select(tmp_path, WALK).paths == expected


# --------------------------------------------------------------------------- --files-from paths


@pytest.fixture
def listed_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """src/ (the working directory) with b.py and a/c.py; outside/o.py next to it, reachable
    from src/ through the symlinked directory linkdir."""
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "b.py").write_text("print(1)\n")
    (tmp_path / "src" / "a" / "c.py").write_text("x = 2\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.py").write_text("secret = 1\n")
    (tmp_path / "src" / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "src")
    return tmp_path / "src"


def files_from(*paths: str) -> list[str]:
    from ingest import PackOptions, list_paths

    return list_paths([], options=PackOptions(files_from=paths))


def test_files_from_paths_are_normalised_inside_the_working_directory(listed_tree: Path) -> None:
    absolute = str(listed_tree / "a" / "c.py")
    assert files_from("a/../b.py", "./a//c.py", absolute, "b.py", "linkdir/../src/b.py") == ["b.py", "a/c.py"]


@pytest.mark.parametrize("path, why", [
    ("../outside/o.py", "is outside the working directory"),
    ("a/../../outside/o.py", "is outside the working directory"),
    ("linkdir/o.py", "leads outside the working directory through a symlink"),
])
def test_a_files_from_path_outside_the_working_directory_is_an_error(listed_tree: Path, path: str, why: str) -> None:
    from ingest.errors import PathOutsideSource

    with pytest.raises(PathOutsideSource) as raised:
        files_from("b.py", path)
    assert str(raised.value) == f"{path} (from --files-from) {why}" and raised.value.hint


def test_an_absolute_files_from_path_elsewhere_is_an_error(listed_tree: Path) -> None:
    from ingest.errors import PathOutsideSource

    elsewhere = str(listed_tree.parent / "outside" / "o.py")
    with pytest.raises(PathOutsideSource, match="is outside the working directory"):
        files_from(elsewhere)


def test_a_missing_files_from_path_is_still_reported_as_missing(listed_tree: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such file: ../nowhere.py"):
        files_from("../nowhere.py")
