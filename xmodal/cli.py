"""The `xmodal` command. Thin: each stage registers its own commands from `xmodal/<stage>/cli.py`."""

from __future__ import annotations

import importlib
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
    "xmodal.objectives.cli",
    "xmodal.train.cli",
    "xmodal.distill.cli",
    "xmodal.hashing.cli",
    "xmodal.eval.cli",
    "xmodal.index.cli",
    "xmodal.compat.cli",
    "xmodal.serve.cli",
    "xmodal.caption.cli",
    "xmodal.demo",
)

for _name in _STAGES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    from typer._click import exceptions as ce  # typer ≥ 0.29 vendors click

    from xmodal.train.profile import mark_command_start

    mark_command_start()  # a training run's profile.json counts its start-up from here
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ce.NoArgsIsHelpError:  # `xmodal data` alone: typer has already shown that group's help
        sys.exit(0)
    except ce.ClickException as e:  # bad flags, missing arguments
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
