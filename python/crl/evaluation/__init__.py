"""Evaluation: attacks x models on held-out prompts, offline judges, capability and over-refusal, report.

`run_evaluation(config, output_dir)` is the entry point; `crl eval CONFIG` is its command line
(`add_eval_arguments` / `run_eval_cli`), and `crl judge-agreement` measures the default judge
against XSTest's human labels (crl.evaluation.judge_agreement).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crl.evaluation.config import EvalConfig, default_demo_eval_config, load_eval_config


def run_evaluation(config: EvalConfig, output_dir: Path, *, progress: bool = True, rejudge: bool = False,
                   regenerate: bool = False, source: str = "eval config") -> dict[str, Any]:
    """Run or resume the evaluation; returns the report summary (also written to output_dir).
    rejudge: judge the stored generations again first (crl.evaluation.runner.run_evaluation);
    regenerate: set aside and make again the records made with other settings (otherwise they refuse
    the run; crl.evaluation.provenance); source: how errors in the config name it (its file)."""
    from crl.evaluation.runner import run_evaluation as _run

    return _run(config, Path(output_dir), progress=progress, rejudge=rejudge, regenerate=regenerate, source=source)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """`crl eval CONFIG [--set K=V] [--output-dir DIR] [--no-progress] [--report-only] [--rejudge] [--regenerate]`."""
    parser.add_argument("config", help="evaluation config (TOML or YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (dotted keys into tables), e.g. judge.kind=refusal_string or max_new_tokens=32")
    parser.add_argument("--output-dir", type=Path, default=None, help="output folder (default: results/CONFIG_NAME); rerunning resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the records already there")
    parser.add_argument("--rejudge", action="store_true",
                        help="judge the stored generations again with the configured judges (after a judge changed), then resume")
    parser.add_argument("--regenerate", action="store_true",
                        help="records made with other settings (an attack's steps, max_new_tokens, an adapter retrained, ...) "
                             "are set aside in records.stale.jsonl and made again; without it such a folder refuses to resume")


def run_eval_cli(args: argparse.Namespace) -> int:
    if args.config == "judge-agreement":
        raise SystemExit("crl judge-agreement is now its own command: crl judge-agreement")
    output_dir = args.output_dir or Path("results") / Path(args.config).stem
    config = load_eval_config(args.config, args.set)
    if args.rejudge and args.report_only:
        raise SystemExit("crl eval: --rejudge and --report-only exclude each other (--rejudge rewrites the report too)")
    if args.report_only:
        from crl.config import ConfigError
        from crl.evaluation.report import markdown_table, write_report

        if not Path(output_dir).is_dir():
            raise ConfigError(f"--output-dir {output_dir}: expected the folder of an evaluation (--report-only)")
        summary = write_report(Path(output_dir), config=config)
        print(markdown_table(summary))
        return 0
    summary = run_evaluation(config, Path(output_dir), progress=not args.no_progress, rejudge=args.rejudge,
                             regenerate=args.regenerate, source=str(args.config))
    from crl.evaluation.report import markdown_table

    print(markdown_table(summary))
    print(f"\nreport: {Path(output_dir) / 'report.md'}")
    return 0


__all__ = ["EvalConfig", "run_evaluation", "default_demo_eval_config", "load_eval_config", "add_eval_arguments", "run_eval_cli"]
