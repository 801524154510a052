"""``python -m pipeline`` is the ``optipipe`` command."""

from pipeline.cli import main

main()
