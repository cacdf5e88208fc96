"""`python -m rpra.cli`: the same entry point as the `rpra` console script."""

from rpra.cli import main

main()
