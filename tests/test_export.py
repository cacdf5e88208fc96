"""training/export.py on real parts: the real SmolLM2 GGUF, a real peft LoRA, llama.cpp's own converters.

A LoRA with random (non-zero) B on q_proj and v_proj is made with peft on the model transformers
loads from the device GGUF, exported both ways, and run in llama.cpp. q_proj is the interesting
one: the converter has to permute its rows the way llama.cpp lays out rotary heads, so a LoRA that
came through wrongly would change the logits in some other way than peft does.

Why the comparisons are not exact: llama.cpp runs the Q4_1 base with 8-bit quantized activations
and an f16 adapter (the merged file: q8_0 weights); transformers runs the same dequantized weights
in fp32. Measured on the two prompts below (adapter effect: up to 9.8-13.6 logits):

                                          logits corr    max |diff|   effect corr (adapted - base)
  GGUF LoRA in llama.cpp vs peft          0.9992-0.9993  0.8-1.2      0.991-0.994
  merged q8_0 vs GGUF LoRA in llama.cpp   0.9988-0.9991  1.2-1.3      0.994-0.995
  base alone, llama.cpp vs transformers   0.9989-0.9994  0.6-1.2      -
  peft, q_proj LoRA rows left unpermuted  0.96                        0.875  (a converter bug)
  peft with another random adapter        0.93                        0.69

So the thresholds (0.99 and 0.97) pass the runtimes' noise and fail a wrongly converted LoRA. Even
without an adapter the two runtimes' top-1 token can swap between near-ties (it did: token 60 vs
504 on the first prompt), so top-1 is checked against the other side's top 5, not for equality.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from rpra.errors import RpraError
from rpra.training import export
from rpra.training.export import ExportError

_SDIST = os.environ.get("RPRA_LLAMA_SDIST")  # read before conftest's isolated_home clears RPRA_* variables
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]

# See the module docstring for the measurements behind these.
MIN_CORRELATION = 0.99  # logits of the same model in llama.cpp and transformers
MIN_EFFECT_CORRELATION = 0.97  # the adapter's effect on the logits, llama.cpp vs peft
MIN_EFFECT = 2.0  # the adapter must move some logit at least this much (it moves one by ~10)

# --- Fixtures: one converter extraction, one transformers model, one adapter per module --------


@pytest.fixture(scope="module")
def tools_home(tmp_path_factory):
    """An RPRA_HOME shared by this module, so the converters are extracted once (not per test)."""
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the per-test isolated_home
        home = tmp_path_factory.mktemp("export-home")
        mp.setenv("RPRA_HOME", str(home))
        if _SDIST:
            mp.setenv("RPRA_LLAMA_SDIST", _SDIST)
        yield home


@pytest.fixture(autouse=True)
def shared_home(isolated_home, tools_home, monkeypatch):
    monkeypatch.setenv("RPRA_HOME", str(tools_home))
    if _SDIST:
        monkeypatch.setenv("RPRA_LLAMA_SDIST", _SDIST)


@pytest.fixture(scope="module")
def gguf(tools_home, model_path) -> Path:
    """The device model (`make test` pulls it first)."""
    return model_path


@pytest.fixture(scope="module")
def peft_model(gguf):
    """SmolLM2 in transformers with a LoRA whose B is random (seeded), so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = export.load_base_model(gguf)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


@pytest.fixture(scope="module")
def adapter_dir(peft_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_config(gguf, tmp_path_factory) -> Path:
    return export.save_base_config(gguf, tmp_path_factory.mktemp("base-config"))


@pytest.fixture(scope="module")
def lora_gguf(adapter_dir, base_config, tmp_path_factory) -> Path:
    return export.lora_to_gguf(adapter_dir, base_config, tmp_path_factory.mktemp("lora") / "adapter.gguf")


def _llama(path: Path, adapter: Path | None = None):
    from rpra.local import LocalModel

    return LocalModel(path, adapter=adapter, n_ctx=256, n_threads=1)


@pytest.fixture(scope="module")
def base_llama(gguf):
    model = _llama(gguf)
    yield model
    model._llm.close()


@pytest.fixture(scope="module")
def adapted_llama(gguf, lora_gguf):
    model = _llama(gguf, lora_gguf)
    yield model
    model._llm.close()


@pytest.fixture(scope="module")
def prompts(base_llama) -> list[list[int]]:
    return [base_llama.chat_tokens([{"role": "user", "content": p}]) for p in PROMPTS]


def next_logits(model, tokens: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits after ``tokens``."""
    with model.lock:
        model.session(tokens)
        return model._logits()


def peft_logits(peft_model, tokens: list[int], *, adapter: bool) -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.tensor([tokens])
        if adapter:
            return peft_model(ids).logits[0, -1].numpy()
        with peft_model.disable_adapter():
            return peft_model(ids).logits[0, -1].numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def top1_in_top5(a: np.ndarray, b: np.ndarray) -> bool:
    """Each side's favourite token is among the other's five best."""
    return int(a.argmax()) in np.argsort(b)[-5:] and int(b.argmax()) in np.argsort(a)[-5:]


def no_leftovers(out: Path) -> bool:
    """Nothing but ``out`` itself (if it exists) is left in its folder: no .part, no temp dir."""
    return [p.name for p in out.parent.iterdir() if p != out] == []


# --- The converter, from the sdist ---------------------------------------------------------------


@pytest.mark.slow
def test_converter_dir_extracts_the_converters_once(tmp_path, monkeypatch):
    tools = export.converter_dir(home=tmp_path)

    assert tools == tmp_path / "tools" / f"llama.cpp-{export.llama_cpp_version()}"
    members = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "conversion/__init__.py")
    for member in members:
        assert (tools / member).is_file(), member
    assert [p.name for p in tools.parent.iterdir()] == [tools.name]  # the temporary folder was renamed
    stamp = (tools / "convert_lora_to_gguf.py").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached converters were extracted again")

    monkeypatch.setattr(export, "_find_sdist", must_not_run)
    monkeypatch.setattr(export, "_extract", must_not_run)
    assert export.converter_dir(home=tmp_path) == tools
    assert (tools / "convert_lora_to_gguf.py").stat().st_mtime_ns == stamp


def test_converter_dir_without_an_sdist_says_where_to_put_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RPRA_LLAMA_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(ExportError, match="RPRA_LLAMA_SDIST=.*is not a file"):
        export.converter_dir(home=tmp_path)
    assert not (tmp_path / "tools").exists() or not any((tmp_path / "tools").iterdir())


def test_a_failed_sdist_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no sdist kept there
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip has nowhere to download from: it fails at once
    with pytest.raises(ExportError, match="(?s)Could not download the llama-cpp-python .* sdist.*RPRA_LLAMA_SDIST"):
        export.converter_dir(home=tmp_path / "home")


def test_a_sdist_without_the_converters_is_refused(tmp_path, monkeypatch):
    import tarfile

    fake = tmp_path / "fake.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(__file__, arcname=f"llama_cpp_python-{export.llama_cpp_version()}/README.md")
    monkeypatch.setenv("RPRA_LLAMA_SDIST", str(fake))
    with pytest.raises(ExportError, match="lacks convert_lora_to_gguf.py"):
        export.converter_dir(home=tmp_path / "home")
    assert not any((tmp_path / "home" / "tools").iterdir())  # no half extraction left to be reused


# --- Adapter: peft LoRA -> GGUF LoRA, run by llama.cpp -------------------------------------------


@pytest.mark.slow
def test_base_config_names_the_architecture(base_config):
    saved = json.loads((base_config / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert saved["model_type"] == "llama"


@pytest.mark.slow
def test_lora_gguf_changes_llama_cpp_logits_as_peft_does(lora_gguf, base_llama, adapted_llama, peft_model, prompts):
    assert lora_gguf.is_file() and no_leftovers(lora_gguf)
    for tokens in prompts:
        base, adapted = next_logits(base_llama, tokens), next_logits(adapted_llama, tokens)
        hf_base, hf_adapted = (peft_logits(peft_model, tokens, adapter=a) for a in (False, True))

        assert np.abs(adapted - base).max() > MIN_EFFECT  # the adapter is applied at all
        assert correlation(adapted, hf_adapted) > MIN_CORRELATION
        assert top1_in_top5(adapted, hf_adapted)
        assert correlation(adapted - base, hf_adapted - hf_base) > MIN_EFFECT_CORRELATION


# --- Merged: one standalone quantized GGUF -------------------------------------------------------


@pytest.mark.slow
def test_merged_gguf_behaves_like_base_plus_adapter(gguf, adapter_dir, base_llama, adapted_llama, prompts, tmp_path):
    out = export.merge_to_gguf(gguf, adapter_dir, tmp_path / "out" / "merged.gguf", quant="q8_0")

    assert out == tmp_path / "out" / "merged.gguf" and no_leftovers(out)
    merged = _llama(out)  # LocalModel also insists on the chat template being in the metadata
    try:
        sample = "Héllo, world! 12345 <|im_end|>"
        assert merged.tokenize(sample) == base_llama.tokenize(sample)
        assert merged.chat_tokens([{"role": "user", "content": PROMPTS[0]}]) == prompts[0]
        for tokens in prompts:
            base, adapted, got = (next_logits(m, tokens) for m in (base_llama, adapted_llama, merged))
            assert correlation(got, adapted) > MIN_CORRELATION
            assert top1_in_top5(got, adapted)
            assert correlation(got - base, adapted - base) > MIN_EFFECT_CORRELATION
    finally:
        merged._llm.close()


# --- Bad input -----------------------------------------------------------------------------------


def test_missing_adapter_dir(tmp_path):
    out = tmp_path / "out" / "adapter.gguf"
    with pytest.raises(ExportError, match="No peft adapter in .*adapter_config.json"):
        export.lora_to_gguf(tmp_path / "no-such-adapter", tmp_path, out)
    assert not out.exists() and not out.with_name(out.name + ".part").exists()

    base = tmp_path / "base.gguf"  # only its header is read before the adapter is checked
    base.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 1, 2) + bytes(4096))
    with pytest.raises(ExportError, match="No peft adapter in .*adapter_config.json"):
        export.merge_to_gguf(base, tmp_path / "no-such-adapter", out)
    assert not out.parent.exists()  # checked before anything is written


def test_unknown_quantization_lists_the_valid_ones(tmp_path):
    with pytest.raises(ExportError, match=r"Unknown quantization 'q9_9'; choose one of .*q8_0.*q4_k_m"):
        export.merge_to_gguf(tmp_path / "base.gguf", tmp_path / "adapter", tmp_path / "out.gguf", quant="q9_9")
    assert not (tmp_path / "out.gguf").exists()


def test_base_config_without_architectures_is_refused_before_converting(tmp_path):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": None}))
    with pytest.raises(ExportError, match="names no architectures.*save_base_config"):
        export.lora_to_gguf(adapter_dir, tmp_path / "base", tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


@pytest.mark.slow
def test_corrupt_adapter_gives_the_converters_error_and_no_file(adapter_dir, base_config, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    out = tmp_path / "out" / "adapter.gguf"

    with pytest.raises(ExportError) as caught:
        export.lora_to_gguf(broken, base_config, out)
    message = str(caught.value)
    assert "convert_lora_to_gguf.py failed" in message and str(broken) in message
    assert "Error" in message.split("\n", 1)[1]  # the converter's own error, from its stderr
    assert isinstance(caught.value, RpraError)
    assert not out.exists() and no_leftovers(out)
