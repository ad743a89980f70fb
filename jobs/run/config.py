"""The job config: one typed section per concern, loaded from a YAML recipe plus `key.sub=value`
overrides. Unknown keys and bad values fail with the full dotted key and what is allowed.

The main job's settings live in one place, the recipe configs/multi30k_small.yaml, which
`aiayn train` and `aiayn prepare` read when no --config is given; the dataclass defaults below
are what a recipe leaves unset. The vocabulary size and the special token ids are the dataset's
(its tokenizer), never the config's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.config import ClusterConfig
from data_pipeline.config import PrepareConfig, StreamConfig, check_name
from data_pipeline.errors import InputError
from data_pipeline.storage import redact_tree
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.config import PRESETS, ModelConfig
from transformer.decoding import PAPER, Decoding

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["inverse_sqrt", "noam"]
Average = Literal["last", "best"]


# configs/multi30k_small.yaml, through the package (jobs/recipes/ links to it), so that an installed
# wheel, which has no configs/, carries it as package data.
DEFAULT_RECIPE = Path(__file__).parents[1] / "recipes" / "multi30k_small.yaml"
# model keys that come from the dataset's tokenizer; setting them could only break training
FROM_DATASET = {"vocab_size": "data.tokenizer.vocab_size", "pad_id": "the tokenizer", "bos_id": "the tokenizer",
                "eos_id": "the tokenizer"}


class ConfigError(InputError):
    """A config problem, reported as one line naming the key (exit 2, like every user mistake)."""


@dataclass(frozen=True)
class OptimConfig:
    schedule: Schedule = "inverse_sqrt"  # "noam" is the paper's eq. 3 (lr is then its scale factor)
    lr: float = 2e-3  # peak learning rate for inverse_sqrt; scale for noam
    warmup_steps: int = 150
    # The last this many of train.max_steps (at most all of them) take the lr linearly down to
    # zero; 0: no decay.
    decay_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 disables gradient clipping

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps <= 0:
            raise ValueError("optim.lr and optim.warmup_steps must be positive")
        if self.decay_steps < 0:
            raise ValueError(f"optim.decay_steps must be 0 (no decay) or positive, got {self.decay_steps}")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 0  # 0: no step limit
    max_epochs: int = 0  # 0: no epoch limit
    max_minutes: float = 14.0  # wall-clock training budget; 0: none
    # Padded tokens per optimizer step over all workers; gradient accumulation is this divided by
    # (workers x stream.max_tokens), rounded, so the step stays the same size when the number of
    # workers changes. 0: cluster.num_workers x stream.max_tokens at the run's first start.
    tokens_per_step: int = 0
    zero_stage: int = 2
    precision: Precision = "fp32"  # bf16 runs on CPU too (DeepSpeed's CPU accelerator); fp16 needs GPUs
    compile: bool | None = None  # torch.compile the model; None: where the workers have GPUs
    threads_per_worker: int = 1  # torch intra-op threads in each worker
    seed: int = 1
    log_every: int = 10
    checkpoint_every_steps: int = 50
    checkpoint_every_minutes: float = 5.0
    keep_checkpoints: int = 4
    # Upload each checkpoint from the workers' staging to the run's storage while training goes on
    # (the next save waits for it); false: training waits for every upload.
    async_checkpoint: bool = True
    validate_every: int = 100
    bleu_every: int = 0  # 0: only at the end
    # Valid BLEU of the checkpoint saved at each bleu_every step, by a separate Ray task while
    # training goes on (jobs/train/checkpoint_bleu.py); false: in the loop, every rank decoding a slice.
    bleu_in_background: bool = True
    bleu_valid_sentences: int = 300
    patience: int = 0  # stop after this many validations without improvement; 0: never
    # The export averages the weights of N checkpoints (§6.1): the last N, or the N of best valid
    # BLEU (needs bleu_every; retention then keeps the best, jobs/checkpoint/retention.py).
    average: Average = "last"
    average_checkpoints: int = 4
    # A moving average of the weights (transformer/ema.py) with this decay, kept by rank 0 and saved
    # in every checkpoint; the export (and the BLEU of checkpoints) then uses it instead of the raw
    # weights. 0: none. Needs ZeRO stage 0-2, where every rank holds the whole weights.
    ema_decay: float = 0.0
    beam_size: int = PAPER.beam_size  # the valid and test BLEU's decoding, recorded in the export
    length_penalty: float = PAPER.alpha
    max_consecutive_skips: int = 10  # stop after this many updates in a row skipped for non-finite gradients
    # A run whose ranks all report no progress for this long is hung: its stacks are kept and the
    # workers restarted from the last checkpoint. None: 10 x the median step time, at least 45 s.
    hang_timeout_s: float | None = None
    # The same for the phases that are legitimately long (start and restore, checkpoint,
    # validation, the end of the run's metric backlog): at least this, or 3 x their longest so far.
    # The collective timeout of the process group is twice this, so that it never fires first.
    long_phase_timeout_s: float = 900.0
    # A rank whose own time per 1,000 of its tokens (forward passes, data wait) is this many times
    # the other ranks' in 3 of every 4 steps of its latest 3+ log windows and 20+ steps is named.
    straggler_factor: float = 1.5
    # Load checkpoints that carry no signature (written by aiayn before it signed them) if they
    # are complete and unchanged. Only for checkpoints you wrote yourself, for this release; a
    # checkpoint signed with another key is refused whatever this says (jobs/checkpoint/signing.py).
    accept_unsigned_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.tokens_per_step < 0:
            raise ValueError(f"train.tokens_per_step must be 0 (derived) or positive, got {self.tokens_per_step}")
        for key in ("threads_per_worker", "log_every", "keep_checkpoints", "average_checkpoints", "beam_size",
                    "max_consecutive_skips"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if not 1 < self.straggler_factor < float("inf"):
            raise ValueError(f"train.straggler_factor must be a number above 1, got {self.straggler_factor}")
        if not 0 < self.long_phase_timeout_s < float("inf"):
            raise ValueError(f"train.long_phase_timeout_s must be a positive number of seconds, got {self.long_phase_timeout_s}")
        if self.hang_timeout_s is not None and not 0 < self.hang_timeout_s < self.long_phase_timeout_s:
            raise ValueError(f"train.hang_timeout_s must be positive and below train.long_phase_timeout_s "
                             f"({self.long_phase_timeout_s:g}), got {self.hang_timeout_s}")
        if self.average_checkpoints > self.keep_checkpoints:
            raise ValueError("train.average_checkpoints cannot exceed train.keep_checkpoints")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be 0 (none) or below 1, got {self.ema_decay}")
        if self.ema_decay and self.zero_stage == 3:
            raise ValueError("train.ema_decay needs the whole weights on a rank; ZeRO stage 3 partitions them: "
                             "use train.zero_stage=2, or train.ema_decay=0")
        if self.average == "best" and not self.bleu_every:
            raise ValueError("train.average=best needs valid BLEU during training: set train.bleu_every")
        if not (self.max_steps or self.max_epochs or self.max_minutes):
            raise ValueError("set at least one of train.max_steps, train.max_epochs, train.max_minutes")

    @property
    def decoding(self) -> Decoding:
        return Decoding(beam_size=self.beam_size, alpha=self.length_penalty)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else a local store ./mlruns
    experiment: str = "aiayn"
    parent_run: str = ""  # an MLflow run id the run is a child of (`aiayn tune` sets it: the sweep's run)
    # The MLflow client's budget per request, on the driver and every worker. MLflow's own
    # defaults (120 s, 7 retries with backoff) let one call to a server that accepts connections
    # and never answers take a quarter of an hour. Metrics are sent by a background thread that
    # keeps what could not be sent, and the driver's other calls never fail a run, so the budget
    # decides how soon an outage is noticed and how long the end of a run waits for the server.
    http_retries: int = 2
    http_timeout_s: float = 30.0
    # Each node's CPU, memory, disk, network and GPU figures (MLflow's collectors) sampled every this
    # many seconds, logged per log window as system/<figure>/min|median|max over the nodes; 0: none.
    system_metrics_every_s: float = 30.0
    # The export is logged as the run's MLflow model (a python_function); with a name here it is
    # also registered in MLflow's Model Registry under it, a new version per run.
    registered_model: str = ""

    def __post_init__(self) -> None:
        if self.system_metrics_every_s < 0:
            raise ValueError(f"tracking.system_metrics_every_s must be 0 (none) or positive, got {self.system_metrics_every_s}")
        if self.http_retries < 0:
            raise ValueError(f"tracking.http_retries must be 0 or more, got {self.http_retries}")
        if self.http_timeout_s < 1:
            raise ValueError(f"tracking.http_timeout_s must be at least 1 (seconds), got {self.http_timeout_s}")

    def environment(self) -> dict[str, str]:
        """MLflow's own variables for a run's clients: this budget, and no progress bars (what a run
        shows, in a terminal and in its log, is aiayn's lines)."""
        return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_retries),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(round(self.http_timeout_s)),
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@dataclass(frozen=True)
class JobConfig:
    name: str = ""  # run name; the same name resumes the same run
    model: ModelConfig = field(default_factory=lambda: PRESETS["small"])
    data: PrepareConfig = field(default_factory=PrepareConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict = field(default_factory=dict)  # raw DeepSpeed keys merged over the generated JSON

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        if self.optim.decay_steps and not self.train.max_steps:
            raise ConfigError(f"optim.decay_steps ({self.optim.decay_steps}) counts down to train.max_steps, which is "
                              "not set: set train.max_steps, or optim.decay_steps=0")

    def with_dataset(self, manifest) -> "JobConfig":
        """The model section completed from the dataset: its vocabulary size and special ids."""
        return self.with_vocabulary(manifest.vocab_size)

    def with_vocabulary(self, vocab_size: int) -> "JobConfig":
        """The model section completed with a vocabulary size and the tokenizer's fixed special ids."""
        model = self.model.replace(vocab_size=vocab_size, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)
        return dataclasses.replace(self, model=model)


def _allowed(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one YAML value to the annotated type.

    The allowed values of a choice are its `Literal` annotation's, checked here and nowhere else:
    every config a user writes, and every one read back from a checkpoint or an export, passes here.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_allowed(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key)
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[X, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every comparison a check could make, and inf is no limit
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def build_section(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """A dataclass from a mapping, starting from `base` (or the class defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        name = data.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{prefix}.preset: unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    if base is None:
        base = cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown key; allowed keys are {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            changes[key] = build_section(hints[key], value, full, getattr(base, key))
        else:
            changes[key] = _coerce(value, hints[key], full)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=100', 'model.preset=tiny'] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `base` with `update` merged in, section by section."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_recipe(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model:, data:, train: ...)")
    return tree


def load_job_config(path: str | None, overrides: list[str]) -> JobConfig:
    """The recipe at `path` (default: the main job's recipe) with the overrides applied."""
    tree = deep_merge(_read_recipe(path or str(DEFAULT_RECIPE)), parse_overrides(overrides))
    model = tree.get("model")
    for key in (model if isinstance(model, dict) else {}):
        if key in FROM_DATASET:
            raise ConfigError(f"model.{key}: comes from the dataset ({FROM_DATASET[key]}); remove it from the config")
    return build_section(JobConfig, tree, "")


def with_values(job: JobConfig, values: dict[str, Any]) -> JobConfig:
    """`job` with each dotted key set to its (parsed) value, checked as a recipe's keys are: a
    sweep's trial. Not `model.preset`, which a resolved config no longer names."""
    tree = config_to_dict(job)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return build_section(JobConfig, tree, "")


def config_to_dict(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def public_config(config: Any) -> dict:
    """The config as it may be printed, logged to MLflow and stored in checkpoints: every string
    redacted of credentials (a tracking URI with a password, a signed URL)."""
    return redact_tree(config_to_dict(config))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the shape MLflow params need."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
