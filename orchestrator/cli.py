"""The `conaclip` command line: one subcommand per step of the data flow.

Each area registers its subcommands from its own module (``register(subparsers)``) so the
parser stays one place to read and each handler stays next to the code it drives. A handler
returns the process exit code. Bad input raises ``trainers.errors.InputError`` (or a pydantic
ValidationError) and is printed as one line, exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from trainers.errors import InputError
from trainers.run_config import describe_validation_error

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C

Registrar = Callable[[argparse._SubParsersAction], None]


def _registrars() -> list[Registrar]:
    """Modules that contribute subcommands."""
    from orchestrator import (
        ablate_cli,
        data_cli,
        export_cli,
        observations_cli,
        replay_cli,
        report_cli,
        train_cli,
    )

    return [
        data_cli.register,
        train_cli.register,
        ablate_cli.register,
        report_cli.register,
        observations_cli.register,
        replay_cli.register,
        export_cli.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conaclip",
        description=(
            "Distil a large CLIP teacher into a small dual encoder and find, by ablation, "
            "which ConaCLIP supervision strategies (learning type x strategy) help. "
            "Every subcommand has --help."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for records such as the experiment description
    try:
        return int(args.handler(args) or 0)
    except InputError as error:
        print(f"conaclip: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as error:
        # A model built from flags rather than from a file: the flags are the source.
        print(f"conaclip: error: {describe_validation_error(error, 'arguments')}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("conaclip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
