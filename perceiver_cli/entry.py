"""The `perceiver` console script's entry point.

It imports nothing but the standard library before it can handle Ctrl-C: an interrupt
while the CLI's own modules (Typer, ~0.1 s) are still loading ends the process quietly
with 130, as an interrupt anywhere later does, never with a traceback.
"""

import os
import sys


def main():
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.flush()
        os._exit(130)
    return cli_main()
