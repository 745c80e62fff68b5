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

        line = plugins.blame(exc) or _out_of_memory(exc)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        raise SystemExit(2) from None


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation that failed (Python's MemoryError, or torch's allocator: its
    RuntimeError names the bytes it tried), else None."""
    text = str(exc).replace("\n", " ")
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        asked = text.split("you tried to allocate ")[-1].split(".")[0] if "tried" in text else ""
        what = f" (an allocation of {asked})" if asked else ""
        return (
            f"out of memory{what}: the batch, model, steps or iterations asked for need more "
            "memory than this machine has; choose smaller ones"
        )
    return None
