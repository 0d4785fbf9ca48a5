"""``main``: parse, run the subcommand, and turn every user error into one line on stderr and a non-zero exit, never
a traceback. ``HPCKD_DEBUG=1`` (or ``hpckd --traceback ...``) prints the full chained traceback of a user error
instead, for a bug report. hpckd's own warnings print as one ``hpckd: warning:`` line, from rank 0 only."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Sequence

from hpckd.cli.parser import DEBUG_ENV, build_parser
from hpckd.cli.ranks import under_wrapper, write_rank_record
from hpckd.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --traceback anywhere (`hpckd train --traceback x=1` too); argv keeps it for the ranks of a relaunch.
    traceback_flag = "--traceback" in argv
    # Overrides may follow options (`hpckd eval ckpt --augmented data.root=x`), which plain argparse rejects.
    args, extra = parser.parse_known_args([a for a in argv if a != "--traceback"])
    if extra and (not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    debug = traceback_flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    previous_show_warning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        text = traceback.format_exc() if debug else f"hpckd: error: {prefix}{exc}\n"
        return _fail("user", text, exc.exit_code, message=str(exc))
    except KeyboardInterrupt:
        return _fail("interrupt", "hpckd: interrupted\n", 130)
    except SystemExit as exc:
        if getattr(exc, "message", None):  # a preemption stop: rank 0 has printed its line already
            write_rank_record({"kind": "stop", "exit_code": exc.code, "text": str(exc.message)})
        raise
    except Exception:
        if not under_wrapper():
            raise  # a bug: the traceback, as Python prints it
        return _fail("bug", traceback.format_exc(), 1)
    finally:
        warnings.showwarning = previous_show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hpckd's own warnings as one ``hpckd: warning: ...`` line (not Python's two-line format), from rank 0
    only; a rank under the torchrun wrapper drops the data warnings that the wrapper has printed already."""
    if not category.__module__.startswith("hpckd."):
        (sys.stderr if file is None else file).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    if os.environ.get("RANK", "0") != "0" or (under_wrapper() and category.__name__ == "SkippedDataWarning"):
        return
    print(f"hpckd: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def _fail(kind: str, text: str, exit_code: int, message: str | None = None) -> int:
    """Report a failure: printed, or (in a rank under the torchrun wrapper) handed to the wrapper, which prints
    one report for all ranks."""
    if under_wrapper():
        write_rank_record({"kind": kind, "exit_code": exit_code, "text": text, "message": message})
    else:
        print(text, file=sys.stderr, end="")
    return exit_code
