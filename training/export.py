"""Bring a peft LoRA adapter trained with transformers back onto llama.cpp.

Training happens in transformers + peft; the device runs llama.cpp. Two ways across:

- ``lora_to_gguf``: the adapter alone as a GGUF LoRA, loaded next to the unchanged base model
  (``LocalModel(path, adapter=...)``). Small, and the base file stays shared.
- ``merge_to_gguf``: one standalone GGUF with the LoRA merged into the weights and quantized, for
  devices where an adapter is inconvenient.

Both use llama.cpp's own converters, and those must come from *the llama.cpp version the runtime
runs*: the GGUF tensor names, metadata keys and LoRA layout move between versions, and PyPI's
``gguf`` package has no converters at all. So ``converter_dir`` takes ``convert_lora_to_gguf.py``,
``convert_hf_to_gguf.py``, the ``conversion/`` package they import and the vendored ``gguf-py`` out
of the sdist of the installed llama-cpp-python (``vendor/llama.cpp/`` in it), once, into a cache.
The converters run in a subprocess on the vendored ``gguf-py``; quantization goes through the
bindings' own ``llama_model_quantize``, i.e. the very library that will load the file.

The train extra installs what the scripts and transformers import besides: PyPI's ``gguf`` (for
transformers to read GGUF files in-process; the converters themselves run on the vendored copy,
first on their path) and ``sentencepiece`` (convert_hf_to_gguf.py imports it for every model).

Every output is written as ``<out>.part`` and renamed only once complete, so a file under its final
name is always whole; failures raise ``ExportError`` and leave no output behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from rpra import config
from rpra.errors import ModelError, RpraError
from rpra.models import check_gguf

Log = Callable[[str], None]

# What the converters need from the sdist's vendor/llama.cpp/ (directories are taken whole).
_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "LICENSE")
_FOLDERS = ("gguf-py/gguf/", "conversion/", "models/templates/")  # templates: chat templates some archs add
_ALSO = ("gguf-py/pyproject.toml", "gguf-py/LICENSE")
_REQUIRED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
             "gguf-py/pyproject.toml", "conversion/__init__.py")

# Quantization names (as llama-quantize spells them, lowercase) -> llama_cpp constant names.
QUANT_TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_lora_to_gguf.py --outtype accepts


class ExportError(RpraError):
    """An adapter or model could not be converted to GGUF (or the converter could not be found)."""


# --- The converter, from the sdist of the installed llama-cpp-python ---------------------------


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ExportError("llama-cpp-python is not installed; run `make setup`.") from None


def converter_dir(*, home: Path | None = None, log: Log | None = None) -> Path:
    """The folder with llama.cpp's converters for the installed llama-cpp-python, extracted once."""
    version = llama_cpp_version()
    dest = Path(home or config.home()) / "tools" / f"llama.cpp-{version}"
    if _complete(dest):
        return dest
    sdist = _find_sdist(version, log)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _say(log, f"Extracting llama.cpp {version} converters from {sdist.name}")
        _extract(sdist, version, tmp)
        if not _complete(dest):  # else a concurrent call finished first
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover (files deleted by hand)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not _complete(dest):  # a concurrent call renamed its copy in between
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def _sdist_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rpra-build" / "sdist"


def _find_sdist(version: str, log: Log | None) -> Path:
    """RPRA_LLAMA_SDIST, else the copy the Makefile keeps, else a download with pip."""
    if env := os.environ.get("RPRA_LLAMA_SDIST"):
        path = Path(env).expanduser()
        if not path.is_file():
            raise ExportError(
                f"RPRA_LLAMA_SDIST={env} is not a file. Point it at llama_cpp_python-{version}.tar.gz or unset it."
            )
        return path
    folder = _sdist_cache()
    path = folder / f"llama_cpp_python-{version}.tar.gz"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    _say(log, f"Downloading the llama-cpp-python {version} sdist (~76 MB) for its converters")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        raise ExportError(
            f"Could not download the llama-cpp-python {version} sdist, which holds llama.cpp's converters "
            f"(pip exit code {done.returncode}):\n{_tail(done.stdout + done.stderr, 15)}\n"
            f"Put llama_cpp_python-{version}.tar.gz in {folder}, or set RPRA_LLAMA_SDIST to its path."
        )
    return path


def _wanted(relative: str) -> bool:
    return relative in _MEMBERS or relative in _ALSO or relative.startswith(_FOLDERS)


def _extract(sdist: Path, version: str, dest: Path) -> None:
    """Copy the converter files out of ``sdist`` into ``dest``."""
    prefix = PurePosixPath(f"llama_cpp_python-{version}/vendor/llama.cpp")
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:  # one pass, in archive order: no re-reading a 76 MB gzip stream
                path = PurePosixPath(member.name)
                if not (member.isfile() and path.is_relative_to(prefix)):
                    continue
                relative = path.relative_to(prefix)
                if _wanted(str(relative)):
                    member.name = str(relative)
                    tar.extract(member, dest, filter="data")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ExportError(f"{sdist} is not a readable llama-cpp-python sdist ({exc}). Delete it, try again.") from None
    if missing := [name for name in _REQUIRED if not (dest / name).is_file()]:
        raise ExportError(
            f"{sdist} lacks {', '.join(missing)} under {prefix}/: not the llama-cpp-python {version} sdist. "
            "Delete it (or fix RPRA_LLAMA_SDIST) and try again."
        )


# --- Running the converters -------------------------------------------------------------------


def _run_converter(script: str, args: list[str], *, what: str, hint: str, log: Log | None) -> None:
    """Run one of llama.cpp's converter scripts on the vendored gguf-py; raise ExportError on failure."""
    tools = converter_dir(log=log)
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # would make the scripts import an installed gguf instead
    paths = [tools / "gguf-py", tools]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything it needs is local; never wait on the network
    _say(log, f"Running {script} on {what}")
    done = subprocess.run([sys.executable, str(tools / script), *args], cwd=tools, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(
            f"llama.cpp's {script} failed on {what} (exit code {done.returncode}):\n"
            f"{_tail(done.stderr or done.stdout, 20)}\n{hint}"
        )


def _finish(part: Path, out: Path, *, what: str) -> Path:
    """Check the ``.part`` file is a GGUF and move it to ``out``."""
    try:
        check_gguf(part)
    except ModelError as exc:
        part.unlink(missing_ok=True)
        raise ExportError(f"The converter reported success but did not write a GGUF file for {what}: {exc}") from None
    os.replace(part, out)
    return out


@contextlib.contextmanager
def _part_file(out: Path) -> Iterator[Path]:
    """``out.part``, removed again if anything fails before it is renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.unlink(missing_ok=True)
    try:
        yield part
    finally:
        part.unlink(missing_ok=True)  # after a successful rename there is nothing left to remove


# --- Adapter: peft LoRA -> GGUF LoRA ----------------------------------------------------------


def save_base_config(base_gguf: Path, out_dir: Path, *, log: Log | None = None) -> Path:
    """Write the HF ``config.json`` of a GGUF model into ``out_dir`` (what ``lora_to_gguf`` needs as base)."""
    base_gguf, out_dir = Path(base_gguf), Path(out_dir)
    _check_base(base_gguf)
    from transformers import AutoConfig

    try:
        base_config = AutoConfig.from_pretrained(base_gguf.parent, gguf_file=base_gguf.name)
    except Exception as exc:  # transformers raises anything from ValueError to KeyError here
        raise ExportError(
            f"transformers could not read the config in {base_gguf} ({type(exc).__name__}: {exc})."
        ) from None
    _set_architectures(base_config)
    base_config.save_pretrained(out_dir)
    return out_dir


def lora_to_gguf(
    adapter_dir: Path, base_config_dir: Path, out: Path, *, outtype: str = "f16", log: Log | None = None
) -> Path:
    """Convert a peft LoRA adapter folder to a GGUF LoRA adapter at ``out``; return ``out``.

    ``base_config_dir`` holds the base model's HF ``config.json`` (``save_base_config`` writes one).
    """
    adapter_dir, base_config_dir, out = (Path(p).resolve() for p in (adapter_dir, base_config_dir, out))
    _check_adapter(adapter_dir)
    _check_base_config(base_config_dir)
    if outtype not in LORA_OUTTYPES:
        raise ExportError(f"Unknown adapter outtype {outtype!r}; choose one of {', '.join(LORA_OUTTYPES)}.")
    with _part_file(out) as part:
        _run_converter(
            "convert_lora_to_gguf.py",
            ["--base", str(base_config_dir), "--outfile", str(part), "--outtype", outtype, str(adapter_dir)],
            what=str(adapter_dir),
            hint="Check that it is a peft LoRA adapter (adapter_config.json + adapter_model.safetensors) "
            "trained on the model whose config is in " + str(base_config_dir) + ".",
            log=log,
        )
        return _finish(part, out, what=str(adapter_dir))


# --- Merged: base + LoRA -> one quantized GGUF -------------------------------------------------


def merge_to_gguf(
    base_gguf: Path, adapter_dir: Path, out: Path, *, quant: str = "q8_0", log: Log | None = None
) -> Path:
    """Merge a peft LoRA into its GGUF base model and write one quantized GGUF at ``out``; return ``out``."""
    base_gguf, adapter_dir, out = (Path(p).resolve() for p in (base_gguf, adapter_dir, out))
    ftype = quant_ftype(quant)  # fail on a bad name before minutes of work
    _check_base(base_gguf)
    _check_adapter(adapter_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Next to ``out`` rather than in /tmp: it holds the fp32 model and an f16 GGUF (~6x the output).
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp, _part_file(out) as part:
        merged, f16 = Path(tmp) / "hf", Path(tmp) / "merged-f16.gguf"
        _save_merged(base_gguf, adapter_dir, merged, log)
        _run_converter(
            "convert_hf_to_gguf.py",
            [str(merged), "--outfile", str(f16), "--outtype", "f16"],
            what=f"{base_gguf.name} merged with {adapter_dir}",
            hint="The merged model was saved by transformers; this architecture may not round-trip through GGUF.",
            log=log,
        )
        if quant.lower() == "f16":  # what the converter wrote already
            os.replace(f16, part)
        else:
            _say(log, f"Quantizing to {quant}")
            quantize(f16, part, ftype)
        return _finish(part, out, what=f"{base_gguf.name} + {adapter_dir.name}")


def load_base_model(base_gguf: Path, *, log: Log | None = None):
    """A GGUF model in transformers as a plain dense fp32 model: what peft trains on and merges into.

    ``dequantize=True`` keeps it dense even where transformers could keep the GGUF blocks packed
    (with the ``kernels`` package installed), since peft cannot train or merge packed layers.
    """
    base_gguf = Path(base_gguf)
    _check_base(base_gguf)
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    _say(log, f"Loading {base_gguf.name} with transformers")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_gguf.parent, gguf_file=base_gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:  # transformers raises anything from ValueError to KeyError here
        raise ExportError(f"transformers could not load {base_gguf} ({type(exc).__name__}: {exc}).") from None
    _set_architectures(model.config)
    return model


def _save_merged(base_gguf: Path, adapter_dir: Path, dest: Path, log: Log | None) -> None:
    """Load the base from its GGUF, merge the LoRA in, save it (and the tokenizer) as an HF folder."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_base_model(base_gguf, log=log)
    _say(log, f"Merging {adapter_dir}")
    try:
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    except Exception as exc:  # safetensors, peft and torch each raise their own kinds
        raise ExportError(
            f"peft could not apply the adapter in {adapter_dir} to {base_gguf.name} ({type(exc).__name__}: {exc}). "
            "Check that it is a LoRA adapter trained on this base model."
        ) from None
    # The weights are dense now; without this, save_pretrained refuses a model "quantized with gguf".
    if (quantizer := getattr(merged, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(merged)
    merged.save_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(base_gguf.parent, gguf_file=base_gguf.name)
    tokenizer.save_pretrained(dest)  # convert_hf_to_gguf.py takes the vocabulary and chat template from here


def quant_ftype(quant: str) -> int:
    """The llama.cpp file type for a quantization name (``q8_0``, ``q4_k_m``, ...)."""
    import llama_cpp

    names = {name: getattr(llama_cpp, const) for name, const in QUANT_TYPES.items() if hasattr(llama_cpp, const)}
    if quant.lower() not in names:
        raise ExportError(f"Unknown quantization {quant!r}; choose one of {', '.join(names)}.")
    return names[quant.lower()]


def quantize(fin: Path, fout: Path, ftype: int) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (the library the runtime loads it with)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with _quiet_llama_log():
        failed = llama_cpp.llama_model_quantize(str(fin).encode(), str(fout).encode(), params) != 0
    if failed:
        Path(fout).unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {fin} to file type {ftype}; its error is printed above.")
    return Path(fout)


@contextlib.contextmanager
def _quiet_llama_log() -> Iterator[None]:
    """Keep llama.cpp's per-tensor quantization log off stderr (its errors still show)."""
    logger = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log through it
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


# --- Small helpers ------------------------------------------------------------------------------


def _set_architectures(model_config) -> None:
    """transformers leaves ``architectures`` unset on a config read from a GGUF; the converters need it."""
    if getattr(model_config, "architectures", None):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"transformers knows no causal LM class for model type {model_config.model_type!r}.")
    model_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_config.model_type]]


def _check_base(base_gguf: Path) -> None:
    try:
        check_gguf(base_gguf)
    except ModelError as exc:
        raise ExportError(f"The base model is unusable: {exc}") from None


def _check_base_config(folder: Path) -> None:
    fix = "Write it with training.export.save_base_config(base_gguf, folder)."
    try:
        base_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"No readable config.json in {folder} ({exc}): the converter needs the base model's HF config. {fix}"
        ) from None
    if not base_config.get("architectures"):
        # Else the converter dies with "Failed to detect model architecture" (a config read from a GGUF lacks it).
        raise ExportError(
            f"{folder}/config.json names no architectures, so the converter cannot tell the model type. {fix}"
        )


def _check_adapter(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"No peft adapter in {adapter_dir} (no adapter_config.json). Pass the folder that "
            "PeftModel.save_pretrained wrote (adapter_config.json + adapter_model.safetensors)."
        )
    if not any((adapter_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ExportError(
            f"{adapter_dir} has an adapter_config.json but no adapter_model.safetensors: the weights are missing."
        )


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _say(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)
