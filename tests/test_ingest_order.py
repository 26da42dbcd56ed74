"""Pack order: first appearance in the history, cached per commit, extended incrementally."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ingest.order import first_appearance, pack_order
from ingest.select import select
from ingest.types import Selection

_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1",
}


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **_ENV, "HOME": str(root.parent)}
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout


def write(root: Path, path: str, text: str = "x\n") -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def commit(root: Path, message: str, *paths: str) -> None:
    for path in paths:
        write(root, path, f"{path}\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "--allow-empty", "-m", message)


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    commit(root, "one", "z_first.py", "b/m.py", "a.py")
    commit(root, "two", "y_second.py")
    commit(root, "three", "0_third.py", "b/a.py")
    return root


def order(root: Path, cache: Path | None = None) -> list[str]:
    return pack_order(select(root), cache)


def test_files_come_in_order_of_first_appearance_ties_by_bytes(repo):
    assert order(repo) == ["a.py", "b/m.py", "z_first.py", "y_second.py", "0_third.py", "b/a.py"]


def test_new_early_sorting_file_goes_last_before_and_after_commit(repo):
    before = order(repo)
    write(repo, "00_new.py")
    assert order(repo) == before + ["00_new.py"]            # untracked: last
    git(repo, "add", "00_new.py")
    assert order(repo) == before + ["00_new.py"]            # staged, no add record yet
    git(repo, "commit", "-q", "-m", "add")
    assert order(repo) == before + ["00_new.py"]            # committed: appended to the history


def test_tracked_without_record_sorts_before_untracked(repo):
    write(repo, "zz_untracked.py")
    write(repo, "aa_staged.py")
    git(repo, "add", "aa_staged.py")
    assert order(repo)[-2:] == ["aa_staged.py", "zz_untracked.py"]


def test_commit_without_content_change_keeps_the_order(repo):
    before = order(repo)
    git(repo, "commit", "-q", "--allow-empty", "-m", "nothing")
    write(repo, "a.py", "changed\n")
    git(repo, "commit", "-q", "-am", "edit")
    assert order(repo) == before


def test_deleted_and_re_added_path_keeps_its_first_place(repo):
    git(repo, "rm", "-q", "a.py")
    git(repo, "commit", "-q", "-m", "rm")
    commit(repo, "back", "a.py")
    assert order(repo)[0] == "a.py"


def test_merged_branch_files_take_the_merge_commits_place(repo, tmp_path):
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, "side", "side_file.py")
    git(repo, "checkout", "-q", "main")
    commit(repo, "main", "main_file.py")
    git(repo, "merge", "-q", "--no-edit", "side")
    assert order(repo)[-2:] == ["main_file.py", "side_file.py"]


def test_cache_is_written_per_commit_and_extended_incrementally(repo, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = first_appearance(repo, cache)
    files = list((cache / "history").glob("*/*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["paths"] == first

    # warm: the same HEAD is answered from the file without asking git for the log
    import ingest.order as order_module

    calls = []
    real = order_module._added_paths
    monkeypatch.setattr(order_module, "_added_paths", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert first_appearance(repo, cache) == first
    assert calls == []

    # a new commit on top: only OLD..HEAD is read, and the answer equals a full recomputation
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, "side", "q_side.py")
    git(repo, "checkout", "-q", "main")
    commit(repo, "more", "c_more.py")
    git(repo, "merge", "-q", "--no-edit", "side")
    incremental = first_appearance(repo, cache)
    assert calls and calls[-1]["since"] is not None
    assert incremental == first_appearance(repo, None) == first + ["c_more.py", "q_side.py"]


def test_corrupt_cache_is_ignored(repo, tmp_path):
    cache = tmp_path / "cache"
    expected = first_appearance(repo, cache)
    for path in (cache / "history").glob("*/*.json"):
        path.write_text("{not json")
    assert first_appearance(repo, cache) == expected


def test_subdirectory_source_uses_the_repository_history(repo):
    commit(repo, "four", "b/0.py")
    assert pack_order(select(repo / "b")) == ["m.py", "a.py", "0.py"]


def test_outside_git_the_order_is_byte_wise(tmp_path):
    selection = Selection(root=tmp_path, paths=["b", "a/z", "B", "é", "a/Z", "_"])
    assert pack_order(selection) == ["B", "_", "a/Z", "a/z", "b", "é"]


def test_repository_without_commits_orders_untracked_by_bytes(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    git(root, "init", "-q")
    for name in ("b.py", "a.py", "C.py"):
        write(root, name)
    assert order(root) == ["C.py", "a.py", "b.py"]


def test_names_with_spaces_newlines_and_unicode(repo):
    commit(repo, "odd", "with space.py", "ünï.py")
    assert order(repo)[-2:] == ["with space.py", "ünï.py"]


def test_submodule_goes_where_its_gitlink_appeared(repo, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    commit(other, "o", "inner.py")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(other), "00_sub")
    git(repo, "commit", "-q", "-m", "sub")
    commit(repo, "later", "later.py")
    selection = select(repo)
    assert "00_sub" in selection.submodules
    assert pack_order(selection)[-2:] == ["00_sub", "later.py"]


def test_recursed_submodule_files_take_the_gitlinks_place(repo, tmp_path):
    from ingest.types import SelectOptions

    other = tmp_path / "other2"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    commit(other, "o", "b.py", "a.py")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(other), "00_sub")
    git(repo, "commit", "-q", "-m", "sub")
    commit(repo, "later", "later.py")
    selection = select(repo, SelectOptions(recurse_submodules=True))
    assert pack_order(selection)[-3:] == ["00_sub/a.py", "00_sub/b.py", "later.py"]
