"""``rpra train sft``: a LoRA adapter that makes the device model predict its own judge score.

The base is loaded with transformers from the very GGUF the device runs (dequantised to fp32), so
the adapter is trained against the weights llama.cpp will apply it to. peft adds the LoRA, trl's
``SFTTrainer`` trains it on CPU on the runtime's own turns (``training.data``), checkpointing as
it goes; an interrupted run resumes from its last checkpoint. At the end the adapter is converted
to a GGUF LoRA with the converter of the llama.cpp version the runtime uses (``training.export``)
and registered under ``RPRA_HOME/adapters/NAME`` for ``--adapter NAME``.

Everything here imports the training stack (torch, transformers, peft, trl); the device runtime
never imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from rpra.adapters import adapters_dir
from rpra.config import Settings
from rpra.errors import ConfigError, RpraError
from rpra.models import file_sha256, resolve
from rpra.training.config import SFTConfig
from rpra.training.data import build_examples, hold_out, load_collection


def train_sft(cfg: SFTConfig, *, log: Callable[[str], None] = print) -> dict:
    """Train (or resume, or return the finished) adapter ``cfg.name``; returns its meta.json."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig as TrlConfig
    from trl import SFTTrainer

    from rpra.local import LocalModel
    from rpra.predictors import ZeroShotPredictor
    from rpra.training.export import load_base_model

    base = resolve(cfg.model)
    base_sha = file_sha256(base)
    out = adapters_dir() / cfg.name
    run_file = out / "run.json"
    run = {"fingerprint": cfg.fingerprint(), "base_sha256": base_sha}
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != run:
            raise ConfigError(
                f"Adapter {cfg.name!r} ({out}) was started with other settings or another base model. "
                "Choose another --name, or delete that folder to start over."
            )
        if (out / "meta.json").exists() and (out / "peft").exists():
            log(f"adapter {cfg.name!r} is already trained ({out}); nothing to do")
            meta = json.loads((out / "meta.json").read_text())
            if cfg.export and not (out / "adapter.gguf").exists():
                meta = export_adapter(out, base, meta, log=log)
            return meta
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run))

    collection = load_collection(cfg.model, cfg.suite, cfg.split)
    records = collection.records
    # The turns are rebuilt with the settings the records were collected with (else the defaults).
    defaults = Settings()
    scale_max = collection.settings.get("scale_max", defaults.scale_max)
    reason_tokens = collection.settings.get("reason_tokens", defaults.reason_tokens)
    local = LocalModel.from_settings(Settings(model=cfg.model, n_ctx=max(cfg.max_length, 512), n_threads=cfg.threads or None, log=False))
    predictor = ZeroShotPredictor()
    built = build_examples(
        records, local, protocols=cfg.protocol_list, loss_on=cfg.loss_on, target=cfg.target,
        system_prompt=lambda protocol: predictor.system_prompt(protocol, scale_max),
        scale_max=scale_max, reason_tokens=reason_tokens, max_length=cfg.max_length,
    )  # fmt: skip
    if not built.examples:
        raise RpraError(f"No usable training examples in {collection.folder} ({dict(built.skipped) or 'no records'}).")
    train, held = hold_out(built.examples, cfg.eval_fraction, cfg.seed)
    log(f"{len(records)} records -> {len(train)} training and {len(held)} held-out sequences"
        + (f"; left out: {dict(built.skipped)}" if built.skipped else ""))  # fmt: skip

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    model = load_base_model(base)
    tokenizer = AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log(f"loaded {base.name} with transformers in {time.perf_counter() - started:.0f} s")

    columns = lambda rows: Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])  # noqa: E731
    args = TrlConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=5,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="epoch" if held else "no",
        max_length=None,  # examples are already within cfg.max_length
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        report_to="none",
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=[m.strip() for m in cfg.target_modules.split(",") if m.strip()],
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=columns(train), eval_dataset=columns(held) if held else None,
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    checkpoint = get_last_checkpoint(args.output_dir) if Path(args.output_dir).exists() else None
    if checkpoint:
        log(f"resuming from {checkpoint}")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - started

    tmp = out / "peft.part"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    meta = {
        "name": cfg.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": cfg.model,
        "base_sha256": base_sha,
        "collection": str(collection.folder),
        "records": len(records),
        "train_sequences": len(train),
        "heldout_sequences": len(held),
        "skipped": dict(built.skipped),
        "config": asdict(cfg),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss": evals[-1] if evals else None,
        "train_wall_s": round(wall, 1),
        "resumed_from": checkpoint,
        "threads": torch.get_num_threads(),
        "peft_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
    }
    (tmp / "rpra-meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out / "peft", ignore_errors=True)
    tmp.rename(out / "peft")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the finished adapter supersedes them
    log(f"trained {meta['steps']} steps in {wall:.0f} s (train loss {result.training_loss:.3f}"
        + (f", eval loss {meta['eval_loss']:.3f})" if evals else ")"))  # fmt: skip
    if cfg.export:
        meta = export_adapter(out, base, meta, log=log)
    return meta


def export_adapter(out: Path, base: Path, meta: dict, *, log: Callable[[str], None] = print) -> dict:
    """Convert ``out/peft`` to ``out/adapter.gguf`` for llama.cpp and record its size."""
    from rpra.training.export import lora_to_gguf, save_base_config

    config_dir = save_base_config(base, out / "base-config")
    gguf = lora_to_gguf(out / "peft", config_dir, out / "adapter.gguf")
    meta = {**meta, "gguf_bytes": gguf.stat().st_size}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"exported {gguf} ({gguf.stat().st_size / 1e6:.1f} MB): use it with --adapter {out.name}")
    return meta


def reexport(folder: Path, *, merge: bool = False, quant: str = "q8_0", output: Path | None = None,
             log: Callable[[str], None] = print) -> Path | None:  # fmt: skip
    """(Re)convert the trained adapter in ``folder`` to a GGUF LoRA; with ``merge``, also write a
    standalone GGUF with the LoRA merged in and quantised, and return its path."""
    from rpra.training.export import merge_to_gguf

    meta = json.loads((folder / "meta.json").read_text())
    base = resolve(meta["base_model"])
    export_adapter(folder, base, meta, log=log)
    if not merge:
        return None
    return merge_to_gguf(base, folder / "peft", output or folder / f"{base.stem}+{folder.name}.{quant}.gguf", quant=quant)
