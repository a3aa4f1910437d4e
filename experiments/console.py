"""What every entry point prints: progress lines, and one-line errors instead of tracebacks.

A ValueError raised by fedgen's own code (a bad config value, missing data, a corrupt checkpoint)
is the user's to fix: it is printed as ``error: <message>`` on one line and the process exits with
status 2. Anything else, including a ValueError raised inside a library, is a bug and keeps its
traceback.
"""
import os
import sys
import traceback

from tqdm import tqdm

_OURS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
    for d in ('fedgen', 'experiments', 'configs'))


def log(msg: str) -> None:
    """One progress line on stdout that does not break a running tqdm bar."""
    tqdm.write(msg, file=sys.stdout)


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` on one line, cut at ``limit`` characters."""
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is fedgen's, experiments' or a config's."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OURS)


def guarded(main):
    """Wraps an absl main: fedgen's ValueErrors become ``error: ...`` and exit status 2."""

    def run(argv):
        try:
            return main(argv)
        except ValueError as e:
            if not raised_by_us(e):
                raise
            sys.stdout.flush()
            print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
            sys.exit(2)

    return run
