"""`--backend` takes a URL or `local` (the embedded engine over a configured server): the
completion scripts offer `local` for it, through bash's own completion machinery."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4cli.app import build_app
from dsv4cli.backend import LOCAL
from dsv4cli.completion import command_tree
from tests.test_completions import _bash_complete


def test_every_backend_option_offers_local():
    backends = {spec.key: option.choices for spec in command_tree(build_app())
                for option in spec.options if option.names[0] == "--backend"}
    assert set(backends) == {"ask", "chat", "review"} and set(backends.values()) == {(LOCAL,)}


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
@pytest.mark.parametrize("command", ["ask", "chat", "review"])
def test_bash_completes_backend_to_local(tmp_path, command):
    assert _bash_complete(f"dsv4 {command} --backend l", tmp_path) == [LOCAL]
