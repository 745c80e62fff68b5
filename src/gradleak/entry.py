"""The ``gradleak`` command's entry point: the CLI is imported inside a Ctrl-C guard, so an
interrupt
while Python still loads the libraries ends as cleanly as one during the work (no traceback)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from gradleak.cli import main as cli

        cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except (Exception, SystemExit) as exc:
        from gradleak import plugins

        line = plugins.blame(exc)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        raise SystemExit(2) from None
