"""The job config: YAML + overrides, errors naming the dotted key, and the generated DeepSpeed JSON."""

from __future__ import annotations

import dataclasses
import pathlib
import typing

import pytest

from jobs.run.config import ConfigError, JobConfig, config_to_dict, flatten, load_job_config
from jobs.train.deepspeed_config import accumulation_steps, deepspeed_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_without_a_config_the_main_recipe_is_read(tmp_path, monkeypatch) -> None:
    recipe = tmp_path / "main.yaml"
    recipe.write_text("train:\n  max_steps: 1234\nstream:\n  max_tokens: 777\n")
    monkeypatch.setattr("jobs.run.config.DEFAULT_RECIPE", recipe)
    job = load_job_config(None, ["train.log_every=3"])
    assert (job.train.max_steps, job.stream.max_tokens, job.train.log_every) == (1234, 777, 3)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_each_recipe_states_only_what_differs_from_the_defaults(recipe: str) -> None:
    """A value restated in a recipe is a second place to change, and the two drift apart."""
    from jobs.run.config import _read_recipe

    defaults = flatten(config_to_dict(JobConfig()))
    stated = flatten(_read_recipe(str(ROOT / "configs" / recipe)))
    assert stated, "the recipe is empty"
    restated = {key: value for key, value in stated.items() if defaults.get(key, object()) == value}
    assert not restated, f"the recipe restates code defaults: {restated}"
    assert load_job_config(str(ROOT / "configs" / recipe), []).train.max_steps == stated["train.max_steps"]


def test_the_main_recipe_is_what_train_reads_without_a_config() -> None:
    from jobs.run.config import DEFAULT_RECIPE

    assert DEFAULT_RECIPE.read_text() == (ROOT / "configs" / "multi30k_small.yaml").read_text()


@pytest.mark.parametrize("size, steps, dropout, averaged", [("base", 100_000, 0.1, 5), ("big", 300_000, 0.3, 20)])
def test_the_wmt14_recipes_are_the_papers_settings(size: str, steps: int, dropout: float, averaged: int) -> None:
    """§5 and §6.1 of the paper, read through the config as a run reads it."""
    job = load_job_config(str(ROOT / "configs" / f"wmt14_en_de_{size}.yaml"), [])
    model, optim, train = job.model, job.optim, job.train
    assert (model.d_model, model.n_heads, model.d_ff) == ((512, 8, 2048) if size == "base" else (1024, 16, 4096))
    assert model.n_layers == 6 and model.norm == "post" and model.share_embeddings and model.dropout == dropout
    assert model.label_smoothing == 0.1 and job.data.tokenizer.vocab_size == 37000
    source = job.data.source
    assert (source.format, source.train, source.hf_config, source.src_lang, source.tgt_lang) == (
        "hf", "wmt14", "de-en", "en", "de")
    assert source.hf_splits == ("train", "validation", "test")  # newstest2013, newstest2014
    assert optim.schedule == "noam" and optim.lr == 1.0 and optim.warmup_steps == 4000
    assert optim.betas == (0.9, 0.98) and optim.eps == 1e-9 and optim.clip_norm == 0
    assert train.max_steps == steps and train.average == "last" and train.average_checkpoints == averaged
    assert train.checkpoint_every_minutes == 10 and (train.beam_size, train.length_penalty) == (4, 0.6)
    # ~25k tokens a side per step, whatever the number of GPUs (the accumulation adapts)
    assert 25_000 <= train.tokens_per_step <= 30_000
    for gpus, micro_batches in ((8, 1), (4, 2), (2, 4)):
        assert accumulation_steps(job, gpus) == micro_batches


@pytest.mark.parametrize("key", ["vocab_size", "pad_id", "bos_id", "eos_id"])
def test_model_keys_that_belong_to_the_dataset_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}: comes from the dataset"):
        load_job_config(None, [f"model.{key}=5"])


def test_the_dataset_completes_the_model_section() -> None:
    class Dataset:  # what with_dataset reads of a Manifest
        vocab_size = 8000

    job = load_job_config(None, []).with_dataset(Dataset())
    assert (job.model.vocab_size, job.model.pad_id, job.model.bos_id, job.model.eos_id) == (8000, 0, 2, 3)
    assert flatten(config_to_dict(job))["model.vocab_size"] == 8000  # what MLflow's params show


def test_overrides_reach_nested_sections_with_types() -> None:
    config = load_job_config(None, ["model.preset=tiny", "model.dropout=0.2", "train.zero_stage=3",
                                    "optim.betas=[0.9, 0.99]", "cluster.use_gpu=false", "data.source.tgt_lang=fr"])
    assert config.model.d_model == 64 and config.model.dropout == 0.2
    assert config.train.zero_stage == 3 and config.optim.betas == (0.9, 0.99)
    assert config.data.source.tgt_lang == "fr"


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "train.nope: unknown key"),
    ("nope.x=1", "nope: unknown key"),
    ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("model.preset=huge", "model.preset: unknown preset 'huge'"),
    ("train.precision=fp8", "train.precision: 'fp8' is not allowed"),
    ("stream.max_tokens=0", "stream.max_tokens must be positive"),
    ("optim.lr=nan", "optim.lr: expected a finite number, got nan"),  # nan passes lr <= 0 unnoticed
    ("train.max_minutes=nan", "train.max_minutes: expected a finite number"),  # a run that never ended
    ("train.max_minutes=inf", "train.max_minutes: expected a finite number"),
    ("no_equals_sign", "overrides look like key.sub=value"),
    ("train.average=first", "train.average: 'first' is not allowed; use 'last' or 'best'"),
    ("train.average=best", "train.average=best needs valid BLEU during training: set train.bleu_every"),
    ("train.average_checkpoints=9", "train.average_checkpoints cannot exceed train.keep_checkpoints"),
    ("train.ema_decay=1", "train.ema_decay must be 0 (none) or below 1"),
    ("optim.decay_steps=-1", "optim.decay_steps must be 0 (no decay) or positive"),
    ("data.encode_actors=-1", "data.encode_actors must be 0 (one per CPU) or positive"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_job_config(None, [override])
    assert "\n" not in str(error.value)


def _choice_keys(cls: type, prefix: str = "") -> list[tuple[str, tuple]]:
    """(dotted key, allowed values) of every field annotated with a Literal, in every section."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _choice_keys(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is typing.Literal:
            keys.append((f"{prefix}{name}", typing.get_args(tp)))
    return keys


def test_every_choice_is_checked_against_its_annotation() -> None:
    """The allowed values of a key are its Literal annotation's, and nothing else lists them."""
    keys = _choice_keys(JobConfig)
    assert {"model.norm", "data.source.format", "cluster.placement_strategy", "train.precision"} <= {k for k, _ in keys}
    for key, allowed in keys:
        with pytest.raises(ConfigError, match=f"^{key}: 'bogus' is not allowed; use {allowed[0]!r} or"):
            load_job_config(None, [f"{key}=bogus"])


def test_a_decay_needs_a_step_budget() -> None:
    with pytest.raises(ConfigError, match=r"optim.decay_steps \(400\) counts down to train.max_steps, which is not set"):
        load_job_config(None, ["optim.decay_steps=400", "train.max_steps=0", "train.max_epochs=1"])


def test_a_moving_average_needs_whole_weights_on_a_rank() -> None:
    with pytest.raises(ConfigError, match="train.ema_decay needs the whole weights on a rank; ZeRO stage 3"):
        load_job_config(None, ["train.ema_decay=0.999", "train.zero_stage=3"])


def test_yaml_errors_name_file_and_line(tmp_path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_job_config(str(recipe), [])
    with pytest.raises(ConfigError, match="no such config file"):
        load_job_config(str(tmp_path / "missing.yaml"), [])


def test_flattened_params_cover_the_whole_config() -> None:
    flat = flatten(config_to_dict(JobConfig()))
    assert flat["train.zero_stage"] == 2 and flat["model.d_model"] == 256 and flat["data.source.format"] == "multi30k"


def test_deepspeed_json_is_generated_and_overridable() -> None:
    config = load_job_config(None, ["train.zero_stage=3", "train.tokens_per_step=16384", "stream.max_tokens=2048",
                                    "optim.clip_norm=0.5"])
    generated = deepspeed_config(config, world_size=2)
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["gradient_accumulation_steps"] == 4 and generated["train_batch_size"] == 8
    assert generated["gradient_clipping"] == 0.5
    raw = load_job_config(None, ["deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert deepspeed_config(raw, 1)["zero_optimization"]["reduce_bucket_size"] == 1000
    assert deepspeed_config(raw, 1)["zero_optimization"]["stage"] == 2


def test_training_uses_the_papers_adam() -> None:
    """The optimizer DeepSpeed builds (§5.3: beta2 0.98, epsilon 1e-9)."""
    adam = deepspeed_config(load_job_config(None, []), world_size=2)["optimizer"]
    assert adam["type"] == "Adam" and adam["params"]["betas"] == [0.9, 0.98] and adam["params"]["eps"] == 1e-9
    assert adam["params"]["lr"] == 2e-3 and not adam["params"]["adam_w_mode"]


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "noam"])
def test_every_schedule_gets_its_base_lr_the_same_way(schedule: str) -> None:
    """The lr a step trains at, as the engine's LambdaLR makes it (base lr x factor): the paper's
    eq. 3 times its scale for noam, fairseq's warm-up to the peak for inverse_sqrt. A schedule whose
    base lr came from elsewhere (once: 1.0 for every schedule but inverse_sqrt) trains at the wrong lr."""
    import torch

    from jobs.train.engine import lr_factor

    job = load_job_config(None, [f"optim.schedule={schedule}", "optim.lr=0.5", "optim.warmup_steps=100",
                                 "model.d_model=256", "train.max_steps=1000"])
    weight = torch.nn.Parameter(torch.zeros(1))
    base_lr = deepspeed_config(job, world_size=1)["optimizer"]["params"]["lr"]
    optimizer = torch.optim.SGD([weight], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(job, s + 1))  # as build_engine
    lrs = {}
    for step in range(1, 401):
        lrs[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    if schedule == "noam":  # 0.5 x 256^-0.5 x min(step^-0.5, step x 100^-1.5)
        assert lrs[100] == pytest.approx(0.5 / 16 / 10) and lrs[400] == pytest.approx(0.5 / 16 / 20)
    else:  # peak 0.5 at the end of warm-up, then 0.5 x sqrt(100 / step)
        assert lrs[50] == pytest.approx(0.25) and lrs[100] == pytest.approx(0.5) and lrs[400] == pytest.approx(0.25)


def test_numbers_in_exponent_notation_are_numbers() -> None:
    """YAML 1.1 reads `1e-4` (no dot) as a string; users write learning rates that way."""
    job = load_job_config(None, ["optim.lr=1e-4", "train.max_minutes=2.5e1"])
    assert job.optim.lr == 1e-4 and job.train.max_minutes == 25.0
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_job_config(None, ["optim.lr=fast"])
