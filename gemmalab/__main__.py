"""``python -m gemmalab`` runs the CLI."""

from .cli import main

main()
