"""`xmodal --help`, a command's help and an argument error answer without importing the heavy libraries:
every package's names load on first use (PEP 562), so the CLI's start-up is typer's alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "open_clip", "fastapi", "uvicorn", "faiss", "numpy", "pyarrow", "PIL")

CODE = """
import contextlib, io, sys
sys.argv = ["xmodal", *{argv!r}]
from xmodal.cli import main
code = 0
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        main()
    except SystemExit as e:
        code = e.code
print(code, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["index", "upgrade", "--help"], 0),
        (["eval", "--help"], 0),
        (["serve", "--help"], 0),
        (["compat", "fit", "--help"], 0),
        (["train", "--no-such-flag"], 2),
        (["search"], 2),
    ],
)
def test_help_and_argument_errors_import_no_heavy_library(argv, code):
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(argv=argv, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1) == [str(code), "[]\n"], out.stdout


def test_the_lazy_packages_still_export_their_names():
    import xmodal.compat
    import xmodal.data
    import xmodal.eval
    import xmodal.index
    import xmodal.objectives
    import xmodal.serve

    for mod in (xmodal.data, xmodal.eval, xmodal.index, xmodal.objectives, xmodal.compat):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, (mod.__name__, name)
    assert callable(xmodal.serve.create_app)
    assert {"clip", "ctp", "modx", "bct", "dcmh"} <= set(xmodal.objectives.REGISTRY)
    with pytest.raises(AttributeError):
        xmodal.data.no_such_name  # noqa: B018
