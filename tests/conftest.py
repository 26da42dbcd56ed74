"""Shared fixtures: every test runs with its own empty DSV4_HOME and no network."""

from __future__ import annotations

import pytest

# tinymodels captures the real home (where `dsv4 pull mini` put the model) at import: import it
# before any test points DSV4_HOME at a temporary directory, whichever test imports it first.
import tests.tinymodels  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def session_dsv4_home(tmp_path_factory):
    """Module- and session-scoped fixtures (a model loaded once per file) are set up before the
    per-test home below: without this they would write caches into the user's real home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSV4_HOME", str(tmp_path_factory.mktemp("dsv4-session-home")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True)
def dsv4_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("dsv4-home")
    monkeypatch.setenv("DSV4_HOME", str(home))
    monkeypatch.delenv("DSV4_MODEL", raising=False)
    monkeypatch.delenv("DSV4_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True)
def default_float_modes():
    """Loading a model turns on flush-to-zero for the whole process (a speed setting);
    put torch's default back so no test depends on which tests ran before it."""
    yield
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests: on two shared cores, OpenMP barriers cost more than
    the work itself. Used through `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
