"""The `xmodal` command. Thin: each stage registers its own commands from `xmodal/<stage>/cli.py`."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from xmodal.errors import UserError

app = typer.Typer(
    name="xmodal",
    help="Train, evaluate and serve cross-modal (image-text) embedding models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module has `register(app: typer.Typer) -> None`. Add a stage here when it gains commands.
_STAGES = (
    "xmodal.data.cli",
    "xmodal.train.cli",
    "xmodal.eval.cli",
    "xmodal.index.cli",
    "xmodal.serve.cli",
    "xmodal.demo",
)

for _name in _STAGES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors (bad flags) come through here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if os.environ.get("XMODAL_DEBUG"):
            raise
        raise
