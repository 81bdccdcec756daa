"""Command-line entry point: ``medsa <command> ...``.

Each sub-command lives in its own module, imported only when that command runs, so that
``medsa --help`` and ``import medsa`` stay fast. A command module provides::

    HELP: str                                   # one-line summary
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def main(args: argparse.Namespace) -> int   # exit code
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medsa import __version__
from medsa.errors import MedsaError

#: command name -> module that implements it
COMMANDS: dict[str, str] = {
    "demo": "medsa.engine.demo",
    "train": "medsa.engine.train",
    "evaluate": "medsa.engine.evaluate_cli",
    "predict": "medsa.engine.predict_cli",
    "reproduce": "medsa.engine.reproduce",
    "params": "medsa.adapters.cli",
    "check-data": "medsa.data.check",
    "serve": "medsa.serve.cli",
    "export": "medsa.export.cli",
}

#: one-line summaries, kept here so ``medsa --help`` imports nothing heavy
SUMMARIES: dict[str, str] = {
    "demo": "LiteMedSAM + box prompts on a bundled dataset, prints a Dice table",
    "train": "adapt SAM on a dataset (Med-SA, MA-SAM, LoRA, full fine-tuning)",
    "evaluate": "Dice / IoU / HD95 / NSD under the papers' prompt protocols",
    "predict": "segment images, volumes and folders, keeping their geometry",
    "reproduce": "methods x datasets x seeds at equal budgets -> paper-style table",
    "params": "print total / tunable parameter counts of a backbone + method",
    "check-data": "integrity check of a dataset folder (nnU-Net style report)",
    "serve": "local web page: click, box, see the mask, save",
    "export": "ONNX export of the image encoder and prompt -> mask decoder (+ adapter)",
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {n:<12} {s}" for n, s in SUMMARIES.items())
    p = argparse.ArgumentParser(
        prog="medsa",
        description="Adapt Segment Anything to medical images.",
        epilog=epilog + "\n\nRun 'medsa <command> --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"medsa {__version__}")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version
        top.print_help()
        return 2
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"medsa {name}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except MedsaError as e:
        print(f"medsa {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
