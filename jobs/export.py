"""One consolidated model export: fp32 weights (safetensors), model config and tokenizer.

Weights come from DeepSpeed's own checkpoint files for every ZeRO stage (zero_to_fp32 rebuilds
them from the optimizer partitions for stages 1-3), optionally averaged over the last N
checkpoints as the paper does. The export is written to a temporary directory and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from jobs import checkpoint as ckpt
from transformer import ModelConfig, build_model
from transformer.averaging import average_state_dicts

WEIGHTS, CONFIG, TOKENIZER, INFO = "model.safetensors", "config.json", "tokenizer.model", "export.json"


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one (complete) checkpoint, whatever its ZeRO stage."""
    job_state = ckpt.read_job_state(checkpoint_dir)
    deepspeed_dir = checkpoint_dir / ckpt.DEEPSPEED_DIR
    if job_state.zero_stage == 0:
        states = torch.load(deepspeed_dir / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=ckpt.DEEPSPEED_TAG)


def export_model(checkpoints: list[Path], model_config: ModelConfig, tokenizer_model: bytes, info: dict,
                 destination: Path) -> Path:
    """Average the checkpoints' weights and write the export atomically; returns `destination`."""
    model = build_model(model_config)
    averaged = average_state_dicts([consolidated_state_dict(c) for c in checkpoints])
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    tied = {"output.proj.weight", "tgt_embed.tokens.weight"}
    if unexpected or set(missing) - tied:
        raise ckpt.CheckpointError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    save_model(model, str(staging / WEIGHTS))
    (staging / CONFIG).write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
    (staging / TOKENIZER).write_bytes(tokenizer_model)
    (staging / INFO).write_text(json.dumps({**info, "averaged_checkpoints": [c.name for c in checkpoints]}, indent=2))
    old = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging, destination)
    shutil.rmtree(old, ignore_errors=True)
    return destination


def load_export(path: Path) -> tuple[torch.nn.Module, ModelConfig, dict]:
    from jobs.config import build_section

    if not (path / WEIGHTS).is_file():
        from data_pipeline.errors import InputError

        raise InputError(f"{path}: no {WEIGHTS}; give a directory written by `aiayn train` (its export/)")
    config = build_section(ModelConfig, json.loads((path / CONFIG).read_text()), "model")
    model = build_model(config)
    load_model(model, str(path / WEIGHTS))
    return model.eval(), config, json.loads((path / INFO).read_text())
