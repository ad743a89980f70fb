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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiayn", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("model-info", help="parameters and FLOPs of a model preset, as JSON")
    info.add_argument("--preset", default="base", help="base, big, a Table 3 row (A1..E), small or tiny")
    info.add_argument("--vocab-size", type=int, default=37000)
    info.add_argument("--seq-len", type=int, default=32, help="source and target length for the FLOPs count")
    info.set_defaults(handler=_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as error:
        print(f"aiayn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
