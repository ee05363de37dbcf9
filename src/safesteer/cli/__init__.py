"""The ``safesteer`` command line: :mod:`safesteer.cli.main` holds the app and the entry point;
one module per command group registers nothing itself and imports only :mod:`.common`."""
