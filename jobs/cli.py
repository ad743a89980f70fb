"""The `aiayn` command line. Parsing only: each subcommand lives in its own module, imported lazily
so that `aiayn --help` and input errors answer quickly. Exit codes: 0 success, 2 usage, config
or input error (one line on stderr), 1 run failure."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _model_info(args: argparse.Namespace) -> int:
    from transformer import build_model, count_parameters, preset
    from transformer.flops import training_flops_per_token

    try:
        config = preset(args.preset, vocab_size=args.vocab_size)
    except ValueError as error:
        raise UserError(str(error)) from error
    model = build_model(config)
    info = {
        "preset": args.preset,
        "parameters": count_parameters(model),
        "training_flops_per_target_token": training_flops_per_token(config, args.seq_len, args.seq_len),
        "flops_sequence_length": args.seq_len,
        "config": config.__dict__,
    }
    print(json.dumps(info, indent=2))
    return 0


def _load_config(args: argparse.Namespace):
    from jobs.config import load_job_config

    return load_job_config(args.config, args.overrides)


def _prepare(args: argparse.Namespace) -> int:
    from cluster.runtime import connect
    from data_pipeline.prepare import plan_prepare, run_prepare

    config = _load_config(args)
    plan = plan_prepare(config.data)
    if plan.up_to_date and not args.force:
        print(f"{config.data.dataset_uri}: already prepared from the same inputs and settings; nothing to do")
        return 0
    connect(args.address or config.cluster.address)
    manifest = run_prepare(plan)
    summary = {split: {"rows": info["rows"], "shards": len(info["shards"])} for split, info in manifest["splits"].items()}
    print(json.dumps({"dataset": config.data.dataset_uri, "splits": summary, "cleaning": manifest["cleaning"]["train"],
                      "vocab_size": manifest["tokenizer"]["vocab_size"], "seconds": manifest["prepare_seconds"]}, indent=2))
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe, e.g. configs/multi30k_small.yaml")
    parser.add_argument("--address", default="", help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiayn", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("model-info", help="parameters and FLOPs of a model preset, as JSON")
    info.add_argument("--preset", default="base", help="base, big, a Table 3 row (A1..E), small or tiny")
    info.add_argument("--vocab-size", type=int, default=37000)
    info.add_argument("--seq-len", type=int, default=32, help="source and target length for the FLOPs count")
    info.set_defaults(handler=_model_info)

    prepare = commands.add_parser("prepare", help="clean, tokenize and shard a corpus into Parquet (a Ray Data job)")
    _add_config_arguments(prepare)
    prepare.add_argument("--force", action="store_true", help="prepare again even if an identical dataset exists")
    prepare.set_defaults(handler=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from data_pipeline.errors import InputError
    from jobs.config import ConfigError

    try:
        return handler(args)
    except (UserError, InputError, ConfigError) as error:
        print(f"aiayn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
