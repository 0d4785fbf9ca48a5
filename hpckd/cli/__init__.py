"""The ``hpckd`` command: :func:`main` (:mod:`hpckd.cli.entry`) parses (:mod:`hpckd.cli.parser`), runs the subcommand
(:mod:`hpckd.cli.commands`), and a run of several ranks started outside a launcher goes through the torchrun wrapper
(:mod:`hpckd.cli.ranks`). Every user error is one line on stderr and a non-zero exit, never a traceback."""

from hpckd.cli.entry import main

__all__ = ["main"]
