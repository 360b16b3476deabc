"""Launcher for the `coopipe` command line from a checkout: ``python cli.py ...`` equals ``coopipe ...``.

The command line itself is the installed library's :mod:`coopipe.cli` (pipeline/coopipe/cli.py).
"""

from coopipe.cli import main

if __name__ == "__main__":
    main()
