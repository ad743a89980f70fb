"""The `aiayn` command line: argument parsing and thin handlers. The work lives in the modules
they import lazily, so that `aiayn --help` and input errors answer quickly. Exit codes: 0 success,
2 usage, config or input error (one line on stderr), 1 run failure."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Callable

from data_pipeline.errors import InputError  # the one error type for user mistakes: exit 2
from data_pipeline.storage import redact
from jobs.inference.scores import TOKENIZED_BLEU

ENGINES = ("auto", "torch", "ctranslate2")  # what jobs.inference.evaluation.open_translator takes
DECODING_HELP = "default: what the model's training run scored with (the paper's beam 4, alpha 0.6 unless set)"
EARLY_EXIT_HELP = ("end a sentence's beam search once its best extension is EOS, not once it has beam-size "
                   "finished hypotheses: faster, and a longer translation that would have won is missed now and "
                   "then (torch engine only)")
DEVICES = ("auto", "cpu", "cuda")  # what jobs.inference.evaluation.inference_device takes
DEVICE_HELP = "cpu, or cuda (the first GPU; the torch engine decodes in float32 there); auto: cuda where torch sees one"
ENGINE_HELP = "torch (our beam search) or ctranslate2 (a model from `aiayn export --format ctranslate2`); auto: by the model"


def _model_info(args: argparse.Namespace) -> int:
    from transformer import build_model, count_parameters, preset
    from transformer.flops import training_flops_per_token

    try:
        config = preset(args.preset, vocab_size=args.vocab_size)
    except ValueError as error:
        raise InputError(str(error)) from error
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
    import dataclasses

    from cluster.job_environment import job_location
    from jobs.run.config import load_job_config

    job = load_job_config(args.config, args.overrides)
    data = dataclasses.replace(job.data, output_dir=job_location("data.output_dir", job.data.output_dir))
    cluster = dataclasses.replace(job.cluster, storage_path=job_location("cluster.storage_path", job.cluster.storage_path))
    return dataclasses.replace(job, data=data, cluster=cluster)


def _prepare(args: argparse.Namespace) -> int:
    from cluster.ray_connection import connect
    from cluster.reachability import check_reaches_every_node
    from data_pipeline.prepare import plan_prepare, run_prepare

    config = _load_config(args)
    plan = plan_prepare(config.data)
    if plan.up_to_date and not args.force:
        print(f"{redact(config.data.dataset_uri)}: already prepared from the same inputs and settings; nothing to do")
        return 0
    connect(args.address or config.cluster.address)
    check_reaches_every_node({"data.output_dir": config.data.output_dir})  # Ray Data tasks run on any node
    manifest = run_prepare(plan)
    summary = {split: {"rows": info["rows"], "shards": len(info["shards"])} for split, info in manifest["splits"].items()}
    print(json.dumps({"dataset": config.data.dataset_uri, "splits": summary, "cleaning": manifest["cleaning"]["train"],
                      "vocab_size": manifest["tokenizer"]["vocab_size"], "seconds": manifest["prepare_seconds"]}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    config = _load_config(args)  # before the heavy imports (torch, MLflow): a bad key answers at once
    if args.address:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, address=args.address))
    if args.name:
        config = dataclasses.replace(config, name=args.name)
    if args.dry_run:
        from jobs.train.dry_run import dry_run

        dry_run(config)
        return 0
    from jobs.train.driver import train

    outcome = train(config, resume_from=args.resume or "")
    print(_summary(outcome))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import dataclasses

    from jobs.tune.spaces import parse_search
    from jobs.tune.sweep import plan_sweep

    config = _load_config(args)
    if args.address:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, address=args.address))
    plan = plan_sweep(config, [parse_search(text) for text in args.search], name=args.name, trials=args.trials,
                      scheduler=args.scheduler, metric=args.metric, concurrent=args.concurrent)
    from jobs.tune.sweep import run_sweep  # Ray Tune only once the sweep's checks have passed

    rows = run_sweep(plan)
    return 0 if any(row.status == "finished" for row in rows) else 1


def _end(args: argparse.Namespace) -> int:
    import dataclasses

    config = _load_config(args)
    from jobs.train.driver import end

    if args.name:
        config = dataclasses.replace(config, name=args.name)
    print(end(config, args.status))
    return 0


def _summary(outcome) -> str:
    """The end of a run in a few lines, with the right way to open it in MLflow."""
    from data_pipeline.storage import redact

    lines = [f"\nrun {outcome.run_name}: {outcome.steps} steps, {outcome.tokens:,} target tokens, "
             f"{outcome.train_seconds / 60:.1f} min of training"]
    if outcome.best_valid_loss is not None:
        lines.append(f"  best valid loss {outcome.best_valid_loss:.3f}")
    if outcome.test is not None:
        lines.append(f"  test BLEU {outcome.test.bleu:.2f}  ({outcome.test.bleu_signature})")
        lines.append(f"  test chrF {outcome.test.chrf:.2f}  ({outcome.test.chrf_signature})")
        if outcome.test.tokenized_bleu is not None:
            lines.append(f"  test {TOKENIZED_BLEU} {outcome.test.tokenized_bleu:.2f}: not sacreBLEU")
    lines.append(f"  export: {redact(outcome.export_uri)}")
    if outcome.model_uri:
        lines.append(f"  MLflow model: {outcome.model_uri}  (mlflow.pyfunc.load_model, aiayn evaluate --model)")
    if outcome.log_path:
        lines.append(f"  log: {outcome.log_path}")
    if outcome.tracking_uri.startswith(("http://", "https://")):  # MLflow's UI finds a run by its id alone
        lines.append(f"  MLflow run: {redact(outcome.tracking_uri.rstrip('/'))}/#/runs/{outcome.run_id}")
    else:
        store = redact(outcome.tracking_uri)
        lines.append(f"  MLflow run: {outcome.run_id} in {store}\n"
                     f"  open it: mlflow ui --backend-store-uri {store}  (then http://127.0.0.1:5000)")
    if outcome.mlflow_lacks:
        lines.append(f"  MLflow lacks {', '.join(outcome.mlflow_lacks)} of this run (its server did not answer): run "
                     "the same command again once it does; the finished run is not trained again, and what MLflow "
                     "lacks is sent, each step once")
    for source, reference, hypothesis in outcome.samples[:3]:
        lines.append(f"\n  SRC {source}\n  REF {reference}\n  HYP {hypothesis}")
    return "\n".join(lines)


def _decoding(args: argparse.Namespace, export: Path):
    """The export's recorded decoding, with --beam, --alpha and --early-exit where given."""
    import dataclasses

    from jobs.inference.export import decoding_of

    given = {"beam_size": args.beam, "alpha": args.length_penalty, "early_exit": args.early_exit or None}
    return dataclasses.replace(decoding_of(export), **{k: v for k, v in given.items() if v is not None})


def _inference_device(args: argparse.Namespace) -> str:
    """The device `--device` names, called before torch is loaded. On the CPU this process keeps
    the memory each decoding step frees for the next one (jobs/train/cpu_allocator.py): normal decoding
    1.07-1.09x faster; its OpenMP threads spin between a step's operators (jobs/train/openmp_spin.py)."""
    from jobs.train.openmp_spin import spin_in_this_process

    spin_in_this_process()  # before torch loads libgomp; nothing on a GPU runs OpenMP regions
    from jobs.inference.evaluation import inference_device
    from jobs.train.cpu_allocator import keep_freed_memory

    device = inference_device(args.device)
    if device == "cpu":
        keep_freed_memory()
    return device


def _evaluate(args: argparse.Namespace) -> int:
    device = _inference_device(args)
    from data_pipeline.manifest import check_tokenizer_matches, load_manifest
    from jobs.inference.evaluation import open_translator, score_split
    from jobs.inference.export import local_export

    manifest = load_manifest(args.data)
    with local_export(args.model) as directory:
        translate, info = open_translator(directory, args.engine, _decoding(args, directory), device=device,
                                          progress=sys.stderr.isatty())
        check_tokenizer_matches(manifest, info["tokenizer_sha256"], args.model)
        score = score_split(translate, manifest, args.split, limit=args.limit)
    scores = score.scores
    print(json.dumps({"split": args.split, "sentences": score.sentences, "bleu": round(scores.bleu, 2),
                      "chrf": round(scores.chrf, 2), "signature": scores.bleu_signature,
                      "chrf_signature": scores.chrf_signature,
                      **({} if scores.tokenized_bleu is None else {
                          "tokenized_bleu": round(scores.tokenized_bleu, 2), "tokenized_bleu_is": TOKENIZED_BLEU})},
                     indent=2))
    return 0


def _translate(args: argparse.Namespace) -> int:
    device = _inference_device(args)
    from data_pipeline.tokenizer import load_tokenizer
    from jobs.inference.evaluation import open_translator
    from jobs.inference.export import TOKENIZER, local_export

    with local_export(args.model) as directory:
        translate, _ = open_translator(directory, args.engine, _decoding(args, directory), device=device,
                                       progress=sys.stderr.isatty())
        tokenizer = load_tokenizer(str(directory / TOKENIZER))
        lines = [line.rstrip("\n") for line in sys.stdin]
        hypotheses = translate(tokenizer.encode([line.strip() for line in lines], add_eos=True))
    for text in tokenizer.decode(hypotheses):
        print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from jobs.inference.ctranslate2_engine import convert_export
    from jobs.inference.export import local_export

    with local_export(args.model) as directory:
        convert_export(directory, args.output, quantization=args.quantization)
    print(f"{args.output}: CTranslate2 model ({args.quantization or 'float32'} weights); use it with "
          f"aiayn translate --engine ctranslate2 --model {args.output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy

    from cluster import PROJECT_ROOT

    benches = PROJECT_ROOT / "bench"
    available = sorted(path.stem for path in benches.glob("*.py") if not path.stem.startswith("_"))
    if args.name not in available:
        raise InputError(f"bench {args.name}: no such benchmark; available: {', '.join(available)}")
    sys.argv = [str(benches / f"{args.name}.py"), *args.bench_args]
    sys.path[:0] = [str(benches), str(benches.parent)]  # as `python bench/NAME.py` from the project root
    runpy.run_path(str(benches / f"{args.name}.py"), run_name="__main__")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from cluster import local_cluster

    if args.action == "up":
        state = local_cluster.up(args.nodes, args.cpus_per_node, with_mlflow=not args.no_mlflow,
                                 with_object_store=not args.no_object_store, isolated=args.isolated,
                                 named_env=args.env)
        print(json.dumps(_cluster_summary(state), indent=2))
        print("plain Ray clients (ray status, ray job ...) on this machine need: export RAY_AUTH_MODE=token",
              file=sys.stderr)
    elif args.action == "add-node":
        print(local_cluster.add_node())
    elif args.action == "remove-node":
        if not args.node:
            raise InputError("remove-node needs a node name (ray-worker-<i>; see `aiayn cluster status --json`)")
        print(local_cluster.remove_node(args.node, grace_s=args.grace))
    elif args.action == "down":
        stopped = local_cluster.down()
        print(f"stopped {len(stopped)} process groups" if stopped else "no cluster was up")
        for kept in (local_cluster.store_dir(), local_cluster.object_store_dir()):
            if kept.is_dir():
                print(f"jobs' datasets and runs are kept in {kept} for the next `up`")
        if local_cluster.mlflow_dir().is_dir():
            print(f"MLflow's runs, artifacts and users are kept in {local_cluster.mlflow_dir()} for the next `up`")
    else:
        info = local_cluster.status()
        ray_status = info.pop("ray_status", "")
        print(json.dumps(info, indent=2))
        if info["up"] and not args.json:
            print(f"jobs' relative locations (data, runs) are kept in {info['storage'] or 'no place'}: "
                  f"{info['storage_kept']}")
        if ray_status and not args.json:
            print(ray_status)
    return 0


def _cluster_summary(state) -> dict:
    from cluster import local_cluster

    return {"ray_address": state.ray_address, "dashboard_and_jobs_api": state.dashboard_url,
            "mlflow": state.mlflow_url, "storage": state.storage, "storage_kept": state.storage_kept,
            "object_store": state.object_store, "nodes": state.nodes,
            "isolated": state.isolated, "logs": state.log_dir, "ray_temp_dir": state.ray_temp_dir,
            "process_groups": state.process_groups,
            "worker_nodes": sorted(state.worker_nodes),
            "cluster_id": state.cluster_id, "credentials": state.credentials,
            "state_file": str(local_cluster.state_file())}


def _submit(args: argparse.Namespace) -> int:
    from cluster.local_cluster import read_state
    from jobs import submit

    command = [c for c in args.command if c != "--"]
    state = None if args.address else read_state()  # submitting to the local cluster: its services
    tracking = args.tracking_uri or (state.mlflow_url if state else "") or os.environ.get("MLFLOW_TRACKING_URI", "")
    cluster_storage = state.storage if state else ""
    name = args.name or f"aiayn-{secrets.token_hex(4)}"
    login = {}
    if state is not None and state.mlflow_url and tracking.rstrip("/") == state.mlflow_url.rstrip("/") \
            and "MLFLOW_TRACKING_USERNAME" not in args.env:  # the job's own MLflow user, not the administrator
        login = _job_mlflow_login(state, tracking, name, command)
    job_id = submit.submit(args.address, command, name=name, tracking_uri=tracking, named_env=args.env,
                           cluster_storage=cluster_storage, mlflow_login=login)
    print(job_id)
    if args.env:
        print(f"passed to the job (values not shown; kept in Ray's job record): {', '.join(args.env)}", file=sys.stderr)
    return 0


def _job_mlflow_login(state, tracking_uri: str, job_id: str, command: list[str]) -> dict[str, str]:
    """A new MLflow user for the job, allowed the experiment and registered model its command's
    config names (none for a command without a config)."""
    from cluster.credentials import read_mlflow_login
    from cluster.mlflow_users import job_login
    from jobs.run.config import load_job_config

    try:
        parsed = build_parser().parse_args(command)
    except SystemExit:
        raise InputError(f"`aiayn {shlex.join(command)}` is not an aiayn command line; see `aiayn --help`") from None
    tracked = load_job_config(parsed.config, parsed.overrides).tracking if hasattr(parsed, "overrides") else None
    admin = read_mlflow_login(Path(state.credentials["mlflow_login"]))
    return job_login(tracking_uri, admin, job_id, tracked.experiment if tracked else "",
                     tracked.registered_model if tracked else "")


def _jobs(args: argparse.Namespace) -> int:
    from jobs import submit

    client = submit.client(args.address)
    if args.action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        raise InputError(f"jobs {args.action} needs a job id")
    if args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "stop":
        print("stopped" if client.stop_job(args.job_id) else "not running")
    elif args.follow:
        submit.follow_logs(args.address, args.job_id)
    else:
        print(client.get_job_logs(args.job_id), end="")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from cluster.bundle import build_wheelhouse

    wheels = build_wheelhouse(Path(args.output), with_dependencies=not args.no_deps)
    print(f"{len(wheels)} wheels in {args.output}; see {args.output}/INSTALL.txt")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe (default: configs/multi30k_small.yaml, the main job)")
    parser.add_argument("--address", default="", help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _translation_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and its decoding, as `evaluate` and `translate` both take them."""
    parser.add_argument("--model", required=True,
                        help="export: a directory, an s3:// or gs:// URI, or an MLflow URI (runs:/<run id>/export)")
    parser.add_argument("--beam", type=int, help=DECODING_HELP)
    parser.add_argument("--length-penalty", "--alpha", type=float, dest="length_penalty",
                        help="the paper's alpha (train.length_penalty); " + DECODING_HELP)
    parser.add_argument("--early-exit", action="store_true", help=EARLY_EXIT_HELP)
    parser.add_argument("--engine", default="auto", choices=ENGINES, help=ENGINE_HELP)
    parser.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiayn", description="Train the Transformer of 'Attention Is All You Need' on Ray, DeepSpeed and MLflow.")
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

    train = commands.add_parser("train", help="train with Ray Train + DeepSpeed, tracked in MLflow")
    _add_config_arguments(train)
    train.add_argument("--name", default="", help="run name; running the same name again resumes it")
    train.add_argument("--resume", default="", metavar="CHECKPOINT_DIR", help="start from this checkpoint")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, data and cluster, print the plan and time a few steps; train nothing")
    train.set_defaults(handler=_train)

    tune = commands.add_parser("tune", help="a Ray Tune sweep of training runs, one MLflow parent run (docs/sweeps.md)")
    _add_config_arguments(tune)
    tune.add_argument("--name", default="", help="the sweep's name; the same name again resumes it")
    tune.add_argument("--search", action="append", default=[], metavar="KEY=SPACE",
                      help="choice(a,b) uniform(lo,hi) loguniform(lo,hi) int(lo,hi) grid(a,b) over any config key")
    tune.add_argument("--trials", type=int, default=4, help="samples of the space (default 4)")
    tune.add_argument("--scheduler", default="asha", help="asha (stops weak trials early) or fifo")
    tune.add_argument("--metric", default="valid/loss", help="valid/loss or valid/bleu")
    tune.add_argument("--concurrent", type=int, default=0, help="trials at once (default: as many as fit)")
    tune.set_defaults(handler=_tune)

    end = commands.add_parser("end", help="mark a run that will not be resumed ended in MLflow, without training")
    _add_config_arguments(end)
    end.add_argument("--name", default="", help="the run's name (as given to train)")
    end.add_argument("--status", default="KILLED", choices=["KILLED", "FAILED"], help="default: KILLED")
    end.set_defaults(handler=_end)

    evaluate = commands.add_parser("evaluate", help="sacreBLEU of an exported model on a prepared split")
    _translation_arguments(evaluate)
    evaluate.add_argument("--data", default="data/multi30k-en-de", help="prepared dataset directory or URI")
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    evaluate.add_argument("--limit", type=int, default=0, help="first N sentences only (0: all)")
    evaluate.set_defaults(handler=_evaluate)

    translate = commands.add_parser("translate", help="translate stdin to stdout, one sentence a line")
    _translation_arguments(translate)
    translate.set_defaults(handler=_translate)

    export = commands.add_parser("export", help="convert an export for a fast inference engine (CTranslate2)")
    export.add_argument("--format", required=True, choices=["ctranslate2"])
    export.add_argument("--model", required=True, help="export: a directory, an s3:// or gs:// URI, or an MLflow URI")
    export.add_argument("--output", required=True, help="directory (or object-store URI) for the converted model")
    export.add_argument("--quantization", default=None, choices=["int8", "int8_float16", "int8_bfloat16", "float16",
                                                                   "bfloat16"], help="weight type (default: float32)")
    export.set_defaults(handler=_export)

    cluster = commands.add_parser("cluster", help="a local multi-node Ray cluster with MLflow and an object store")
    cluster.add_argument("action", choices=["up", "status", "add-node", "remove-node", "down"])
    cluster.add_argument("node", nargs="?", default="", help="remove-node: the worker node (ray-worker-<i>)")
    cluster.add_argument("--grace", type=float, default=30.0,
                         help="remove-node: seconds between the preemption notice and stopping the node")
    cluster.add_argument("--nodes", type=int, default=3)
    cluster.add_argument("--cpus-per-node", type=int, default=2)
    cluster.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    cluster.add_argument("--no-object-store", action="store_true",
                         help="with --isolated: do not start the S3-compatible object store")
    cluster.add_argument("--isolated", action="store_true",
                         help="each node in its own mount namespace: private /tmp, home and working directory (root)")
    cluster.add_argument("--json", action="store_true", help="status: JSON only (addresses, object store, jobs)")
    cluster.add_argument("--env", action="append", default=[], metavar="NAME",
                         help="up: pass this variable (a credential) to every node and so to every job; repeatable. "
                              "Nothing else whose name or value looks like a credential is passed")
    cluster.set_defaults(handler=_cluster)

    submit = commands.add_parser("submit", help="run any aiayn command as a Ray job (Jobs API)")
    submit.add_argument("--address", default="", help="Jobs API URL, e.g. http://127.0.0.1:8265 (default: local cluster)")
    submit.add_argument("--name", default="", help="submission id")
    submit.add_argument("--tracking-uri", default="", help="MLFLOW_TRACKING_URI for the job")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this variable of your shell to the job (repeatable); nothing secret is passed "
                             "otherwise, since Ray keeps job variables in its record and logs")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- <aiayn command>")
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="status, logs, stop or list submitted jobs")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job_id", nargs="?", default="")
    jobs.add_argument("--address", default="")
    jobs.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    jobs.set_defaults(handler=_jobs)

    bench = commands.add_parser("bench", help="run a benchmark under bench/ by name (its options follow)")
    bench.add_argument("name", help="e.g. model_throughput, data_throughput, object_store")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(handler=_bench)

    bundle = commands.add_parser("bundle", help="a wheelhouse of the project and its dependencies, for offline nodes")
    bundle.add_argument("--output", default="wheelhouse")
    bundle.add_argument("--no-deps", action="store_true", help="the project's own wheel only")
    bundle.set_defaults(handler=_bundle)
    return parser


def main(argv: list[str] | None = None) -> int:
    # What aiayn and the processes it starts (Ray, MLflow, the object store) make is this
    # account's alone: runs, data, logs, stores. A location the user made keeps its own mode.
    os.umask(os.umask(0o077) | 0o077)
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from cluster.services import ServiceError
    from jobs.run.lease import LeaseLost

    try:
        return handler(args)
    except InputError as error:
        print(f"aiayn {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except (ServiceError, LeaseLost) as error:
        print(f"aiayn {args.command}: failed: {redact(str(error))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
