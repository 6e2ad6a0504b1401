"""The ``hpo-sync`` command's entry point.

Importing the command line (argparse, structlog, the config's modules) takes ~150 ms, and a
signal in that time gets its default action: a SIGHUP (a reload) would kill ``run``, a
SIGTERM would kill ``sync`` instead of stopping it with 143. So this module imports nothing
but :mod:`hpo_sync.held_signals` and holds the signals before it imports the rest;
:func:`hpo_sync.cli.main` then keeps held what its command takes over and gives the others
back as they were (delivered again if they came meanwhile, unless they were ignored, as
``nohup`` ignores SIGHUP).
"""

from __future__ import annotations

from . import held_signals


def main() -> int:
    held_signals.hold()
    from .cli import main as cli_main

    return cli_main()
