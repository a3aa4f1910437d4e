"""What every entry point prints: progress lines, and one-line errors instead of tracebacks.

A ValueError from fedgen (a bad config value, missing data, a corrupt checkpoint) is the user's to
fix: it is printed as ``error: <message>`` (its first line, with the cause kept) and the process
exits with status 2. Anything else is a bug and keeps its traceback.
"""
import sys

from tqdm import tqdm


def log(msg: str) -> None:
    """One progress line on stdout that does not break a running tqdm bar."""
    tqdm.write(msg, file=sys.stdout)


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` on one line, cut at ``limit`` characters."""
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def guarded(main):
    """Wraps an absl main: fedgen's ValueErrors become ``error: ...`` and exit status 2."""

    def run(argv):
        try:
            return main(argv)
        except ValueError as e:
            sys.stdout.flush()
            print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
            sys.exit(2)

    return run
