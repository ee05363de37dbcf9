"""``python -m safesteer``: the same as the ``safesteer`` command."""

from safesteer.cli.main import main

main()
