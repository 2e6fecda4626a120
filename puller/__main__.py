"""``python -m puller`` runs the command line."""

from .cli import run

run()
