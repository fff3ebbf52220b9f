"""The ``dynattn-fer`` command (also ``python -m dynattn.fer``).

Subcommands:

* ``train``: train a classifier (:mod:`dynattn.fer.train`); under ``torchrun`` it uses DDP.
* ``eval``: accuracy, mean per-class accuracy, macro-F1, per-class table and confusion matrix of a checkpoint
  (:mod:`dynattn.fer.evaluate`).
* ``predict``: detect and classify the faces in images (:mod:`dynattn.fer.predict`).
* ``datasets``: list the dataset names and their options.

Errors in the user's input (bad option, missing file, malformed dataset) are reported as one line
``dynattn-fer <command>: error: ...`` with exit status 2; ``--traceback`` shows the full trace instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional, Sequence

__all__ = ["build_parser", "main"]

# subcommand -> (module, function adding its options, function running it, one-line help); modules are
# imported only when their subcommand is asked for, so `train` works without the eval/predict dependencies
_COMMANDS = {
    "train": ("dynattn.fer.train", "add_train_args", "run_train", "train a classifier"),
    "eval": ("dynattn.fer.evaluate", "add_eval_args", "run_eval", "evaluate a checkpoint on a dataset split"),
    "predict": ("dynattn.fer.predict", "add_predict_args", "run_predict", "classify the faces in images"),
}


def _run_datasets(args: argparse.Namespace) -> int:
    from .datasets import dataset_names, dataset_options

    for name in dataset_names():
        opts = ", ".join(f"{k}={v!r}" for k, v in dataset_options(name).items())
        print(f"{name:16s} {opts}")
    return 0


def _load(command: str, attr: str) -> Callable:
    module = _COMMANDS[command][0]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ImportError(f"`dynattn-fer {command}` is unavailable: {e} "
                          '(install the FER extras: pip install "dynattn[fer]")') from e


def _add_traceback(parser: argparse.ArgumentParser) -> None:
    # accepted before and after the subcommand; SUPPRESS keeps a subparser's default from overriding the other
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="show the full Python traceback on errors")


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The argument parser, with the options of ``commands`` (default: all) filled in."""
    parser = argparse.ArgumentParser(
        prog="dynattn-fer",
        description="Facial expression recognition with bi-level routing attention ViTs: train, evaluate, predict.",
        epilog="Multi-GPU / multi-node: torchrun --nproc_per_node N -m dynattn.fer train ...",
    )
    _add_traceback(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = set(_COMMANDS if commands is None else commands)
    for name, (_, add, run, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_traceback(p)
        if name in wanted:
            _load(name, add)(p)
            p.set_defaults(func=run)
    p = sub.add_parser("datasets", help="list the dataset names and their options")
    _add_traceback(p)
    p.set_defaults(func=_run_datasets)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``dynattn-fer`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the chosen subcommand's module is imported (a missing optional dependency of `predict` must not
    # break `train`); --help with no subcommand lists them all without importing any
    command = next((a for a in argv if not a.startswith("-")), None)
    commands = [command] if command in _COMMANDS else []
    try:
        parser = build_parser(commands)
    except ImportError as e:  # e.g. `predict` without OpenCV: say what to install instead of a traceback
        print(f"dynattn-fer {command}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    func = args.func
    if isinstance(func, str):
        func = _load(args.command, func)
    if getattr(args, "traceback", False):
        return int(func(args) or 0)
    try:
        return int(func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"dynattn-fer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynattn-fer {args.command}: interrupted", file=sys.stderr)
        return 130
