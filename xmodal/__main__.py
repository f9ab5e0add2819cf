"""`python -m xmodal …` (and `torchrun -m xmodal train …`) run the CLI."""

from xmodal.cli import main

main()
