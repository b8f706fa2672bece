"""`python -m prumerge_cli` runs the CLI."""

from .cli import main

main()
