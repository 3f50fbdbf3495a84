"""The `crl` command line: train, merge, data build, testbed build, demo, eval, probe-layers and bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crl.config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from crl.training.config import load_train_config
    from crl.training.trainer import train

    config = load_train_config(args.config, args.set)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: expected an integer >= 1, got {args.max_steps}")
    output_dir = args.output_dir or Path("runs") / Path(args.config).stem
    try:
        result = train(config, output_dir, resume=args.resume, max_steps=args.max_steps)
    except ConfigError as exc:  # found by the run (a layer beyond the model, a bad pool file): name the file too
        sections = tuple(f"{f}." for f in config.to_dict())
        raise ConfigError(f"{args.config}: {exc}" if str(exc).startswith(sections) else str(exc)) from None
    skipped = f" ({result.skipped_steps} of them without an update: non-finite loss)" if result.skipped_steps else ""
    print(f"trained {result.steps} of {config.optim.max_steps} steps{skipped}; run folder: {result.output_dir}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from crl.training.export import merge_adapter

    out = merge_adapter(args.run_dir, args.out_dir)
    print(f"merged model written to {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from crl.benchmarks.mining import main as mining_main  # argparse allows only "mining"

    return mining_main(args.rest)


def _cmd_demo(args: argparse.Namespace) -> int:
    from crl.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA adapter with CRL, Circuit Breakers or RepBend")
    p.add_argument("config", help="TOML or YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=2e-4")
    p.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/CONFIG_NAME)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (the schedule keeps optim.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("merge", help="merge a run's adapter into its base model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("data", help="build training pools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="make harmful/benign/retain pools by generating with the base model")
    from crl.data.build import add_build_arguments, run_build

    add_build_arguments(build)
    build.set_defaults(func=run_build)

    p = sub.add_parser("eval-summary", help="mean and range over seeds of several crl eval folders per setting")
    from crl.evaluation.seeds import add_summary_arguments, run_summary_cli

    add_summary_arguments(p)
    p.set_defaults(func=run_summary_cli)

    p = sub.add_parser("testbed", help="a refusing model built on the CPU (the safety-tuned regime the paper defends)")
    testbed_sub = p.add_subparsers(dest="testbed_command", required=True)
    tb = testbed_sub.add_parser("build", help="LoRA-tune the base model to refuse the demo's harmful prompts, merge, cache")
    from crl.testbed import add_testbed_arguments, run_testbed_cli

    add_testbed_arguments(tb)
    tb.set_defaults(func=run_testbed_cli)

    p = sub.add_parser("demo", help="the offline demo: build pools with SmolLM2, train CRL on the CPU, compare")
    from crl.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("eval", help="evaluate a base model and adapters under attacks")
    from crl.evaluation import add_eval_arguments, run_eval_cli

    add_eval_arguments(p)
    p.set_defaults(func=run_eval_cli)

    p = sub.add_parser("judge-agreement", help="agreement of a judge with human labels (XSTest) and with labelled generations")
    from crl.evaluation import judge_agreement

    judge_agreement.add_arguments(p)
    p.set_defaults(func=judge_agreement.run)

    p = sub.add_parser("probe-layers", help="per-layer linear probe of the base model: which layers separate harmful from harmful-sounding safe prompts")
    from crl.evaluation import layer_probe

    layer_probe.add_arguments(p)
    p.set_defaults(func=layer_probe.run)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=["mining"], help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see crl bench mining --help)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user's mistake (ConfigError: a bad config value, data file, model path or
    output folder; a missing file) is one line on stderr, `crl: error: ...`, and exit code 2; a run
    stopped by a non-finite loss is one line and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from crl.training.trainer import TrainingDiverged

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"crl: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"crl: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip()


if __name__ == "__main__":
    sys.exit(main())
