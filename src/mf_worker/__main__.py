"""``python -m mf_worker`` runs the CLI (handy where the console script is not on PATH)."""

from .cli import main

main()
