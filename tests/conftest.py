"""Shared fixtures: every test runs with its own empty DSV4_HOME and no network."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def dsv4_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("dsv4-home")
    monkeypatch.setenv("DSV4_HOME", str(home))
    monkeypatch.delenv("DSV4_MODEL", raising=False)
    monkeypatch.delenv("DSV4_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
