"""One consolidated model export: fp32 weights (safetensors), model config and tokenizer.

Weights come from DeepSpeed's own checkpoint files for every ZeRO stage (zero_to_fp32 rebuilds
them from the optimizer partitions for stages 1-3), optionally averaged over the last N
checkpoints as the paper does. export.json is written last and marks a complete export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.errors import InputError
from jobs import checkpoint as ckpt
from jobs.checkpoint.signing import Signer
from jobs.run.config import build_section
from transformer import ModelConfig, build_model
from transformer.averaging import average_state_dicts
from transformer.config import saved_model_section
from transformer.decoding import PAPER, Decoding

WEIGHTS, CONFIG, TOKENIZER, INFO = "model.safetensors", "config.json", "tokenizer.model", "export.json"


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one (complete) checkpoint, whatever its ZeRO stage."""
    job_state = ckpt.read_job_state(str(checkpoint_dir))
    deepspeed_dir = checkpoint_dir / ckpt.DEEPSPEED_DIR
    if job_state.zero_stage == 0:
        with ckpt.weights_only_loads(checkpoint_dir):
            states = torch.load(deepspeed_dir / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
        return {k: v.float() for k, v in states["module"].items()}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would guess, without its warning
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    narration = io.StringIO()  # zero_to_fp32 narrates every shard it reads; its errors are raised
    with contextlib.redirect_stdout(narration), contextlib.redirect_stderr(narration), \
            ckpt.weights_only_loads(checkpoint_dir):
        return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=ckpt.DEEPSPEED_TAG)


def checkpoint_weights(checkpoint_dir: Path, moving_average: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint exports: its moving average of the weights (train.ema_decay), or
    the weights DeepSpeed saved."""
    if not moving_average:
        return consolidated_state_dict(checkpoint_dir)
    saved = ckpt.saved_weight_average(checkpoint_dir)
    if saved is None:
        raise ckpt.CheckpointError(f"{checkpoint_dir.name} has no moving average of the weights (saved before "
                                   "train.ema_decay was set); export it with train.ema_decay=0")
    return saved[0]


def export_model(checkpoints: list[Path], model_config: ModelConfig, tokenizer_model: bytes, info: dict,
                 destination: Path, moving_average: bool = False, signer: Signer | None = None) -> Path:
    """Average the local checkpoints' weights (each one's moving average of the weights, with
    `moving_average`) into a new local directory `destination`; publishing it where users find it
    (atomically) is `data_pipeline.storage.publish_directory`'s job."""
    model = build_model(model_config)
    bar = tqdm(checkpoints, desc="exporting", unit="checkpoint", disable=not sys.stderr.isatty(), leave=False)
    averaged = average_state_dicts([checkpoint_weights(c, moving_average) for c in bar])
    broken = [name for name, tensor in averaged.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ckpt.CheckpointError(f"{', '.join(c.name for c in checkpoints)}: weights {broken[:3]} are not finite; "
                                   "not exporting them")
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    tied = {"output.proj.weight", "tgt_embed.tokens.weight"}
    if unexpected or set(missing) - tied:
        raise ckpt.CheckpointError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return write_export(model, tokenizer_model, {**info, "averaged_checkpoints": [c.name for c in checkpoints],
                                                 "weights": "moving average" if moving_average else "as trained"},
                        destination, signer)


def write_export(model: torch.nn.Module, tokenizer_model: bytes, info: dict, destination: Path,
                 signer: Signer | None = None) -> Path:
    """The export's files in a new local directory, INFO last (it marks the export complete);
    with `signer`, INFO records each file's sha256 under its author's signature."""
    destination.mkdir(parents=True)
    save_model(model, str(destination / WEIGHTS))
    (destination / CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    (destination / TOKENIZER).write_bytes(tokenizer_model)
    if signer is not None:
        record = _signed_record(destination, info)
        info = {**info, SIGNED: {"files": record["files"], **signer.sign("export", "", record)}}
    (destination / INFO).write_text(json.dumps(info, indent=2))
    return destination


SIGNED = "signed"  # INFO's key for the files' sha256 and their author's signature


def _signed_record(directory: Path, info: dict) -> dict:
    """What an export's signature covers: its files' sha256 and the rest of its INFO."""
    files = {name: storage.sha256_of(str(directory / name)) for name in (WEIGHTS, CONFIG, TOKENIZER)}
    return {"files": files, "info": {key: value for key, value in info.items() if key != SIGNED}}


def verify_export(directory: Path, signer: Signer) -> None:
    """Refuse (SignatureError, one line) an export that `signer`'s key did not sign, or whose
    files changed since."""
    info = json.loads((directory / INFO).read_text())
    signed = info.get(SIGNED)
    signature = {key: value for key, value in signed.items() if key != "files"} if isinstance(signed, dict) else None
    signer.check("export", "", _signed_record(directory, info), signature, str(directory))


def decoding_of(path: Path) -> Decoding:
    """The decoding the export's run scored with (beam size and length penalty); the paper's for
    exports made before it was recorded."""
    recorded = json.loads((path / INFO).read_text()).get("decoding", {})
    return Decoding(beam_size=int(recorded.get("beam_size", PAPER.beam_size)),
                    alpha=float(recorded.get("length_penalty", PAPER.alpha)))


def load_export(path: Path) -> tuple[torch.nn.Module, ModelConfig, dict]:
    if not (path / INFO).is_file() or not (path / WEIGHTS).is_file():
        raise InputError(f"{path}: not a complete export (no {INFO} or {WEIGHTS}); give the export/ of a run")
    config = build_section(ModelConfig, saved_model_section(json.loads((path / CONFIG).read_text())), "model")
    model = build_model(config)
    load_model(model, str(path / WEIGHTS))
    return model.eval(), config, json.loads((path / INFO).read_text())


@contextlib.contextmanager
def local_export(reference: str) -> Iterator[Path]:
    """An export as a local directory for as long as it is needed: a local path as it is; an
    MLflow URI (runs:/<id>/export, or a model of aiayn's: models:/NAME/VERSION) or an object-store
    URI downloaded into a temporary directory that is removed afterwards."""
    if storage.is_local(reference) and ":/" not in reference:
        yield Path(reference)
        return
    with tempfile.TemporaryDirectory(prefix="aiayn-export-") as scratch:
        if reference.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            import mlflow  # MLflow (and what uses it) only for an MLflow URI

            from jobs.inference.model_registry import export_inside
            from jobs.report.tracking import resolve_tracking_uri

            mlflow.set_tracking_uri(resolve_tracking_uri(""))  # where aiayn train tracks by default too
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=scratch))
            yield export_inside(downloaded) if (downloaded / "MLmodel").is_file() else downloaded
        else:
            storage.copy_dir(reference, scratch)
            yield Path(scratch)
