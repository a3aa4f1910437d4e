"""What every entry point prints: progress lines, and one-line errors instead of tracebacks.

A ValueError raised by fedgen's own code (a bad config value, missing data, a corrupt checkpoint)
is the user's to fix: it is printed as ``error: <message>`` on one line and the process exits with
status 2. Anything else, including a ValueError raised inside a library, is a bug and keeps its
traceback.

Every command runs its ``main`` with :func:`run_main`, which also parses the command line with
:func:`parse_flags`: a mistyped ``--config.a.b`` field (with the close matches among its section's
fields), a value of the wrong type, an unknown config variant, a missing config file or an unknown
flag is one ``error: ...`` line and exit status 2, before any compute. It leaves absl logging at
WARNING unless ``--verbosity`` / ``-v`` was given, so library INFO lines (jax's backend probe,
Orbax's saves) stay off the console.

Progress (:func:`progress`) is a tqdm bar on a terminal, and one plain line per round (or every k
rounds) when stdout is a file or a pipe.
"""
import difflib
import os
import re
import sys
import time
import traceback

from absl import app, flags, logging
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


def fail(message: str, status: int = 2):
    """Prints ``error: <message>`` as one line on stderr and exits with ``status``."""
    sys.stdout.flush()
    print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(main):
    """Wraps an absl main: fedgen's ValueErrors and absl UsageErrors become ``error: ...`` and
    exit status 2."""

    def run(argv):
        try:
            return main(argv)
        except app.UsageError as e:  # a required flag missing: one line, not absl's usage page
            fail(f'{e} (see --helpshort)')
        except ValueError as e:
            if not raised_by_us(e):
                raise
            fail(str(e))

    return run


# --------------------------------------------------------------------------- the command line


def _config_flags() -> dict:
    """{name: flag} of the flags defined by ``config_flags.DEFINE_config_file``."""
    from ml_collections.config_flags import config_flags
    return {
        name: fl
        for name, fl in flags.FLAGS._flags().items()
        if isinstance(fl.parser, config_flags.ConfigFileFlagParser) and name == fl.name
    }


def _given(argv: list[str], name: str) -> list[tuple[str, str | None]]:
    """(flag name, value) of every ``--name=v`` / ``--name v`` / ``--name.x.y=v`` in ``argv``."""
    out = []
    for i, arg in enumerate(argv[1:], 1):
        if arg == '--':
            break
        m = re.fullmatch(rf'--?({re.escape(name)}(?:\.[\w.]*)?)(=(.*))?', arg, re.S)
        if m:
            value = m[3] if m[2] else (argv[i + 1] if i + 1 < len(argv) else None)
            out.append((m[1], value))
    return out


def _kind(value) -> str:
    """What an override of a field holding ``value`` must be, in words."""
    if isinstance(value, bool):
        return 'a boolean (true or false)'
    if isinstance(value, int):
        return 'an integer'
    if isinstance(value, float):
        return 'a number'
    if isinstance(value, str):
        return 'a string'
    return f'a {type(value).__name__}'


def _field_error(name: str, config, path: str) -> str | None:
    """Why ``--name.path`` names no field of ``config`` (with close matches), or None."""
    node, seen = config, name
    for part in path.split('.'):
        if hasattr(node, 'keys') and not isinstance(node, type):
            keys = [str(k) for k in node.keys()]
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = ('; did you mean ' + ' or '.join(f'`{c}`' for c in close) +
                        '?' if close else f'; its fields: {", ".join(sorted(keys))}')
                return f'--{name}.{path}: {seen} has no field `{part}`{hint}'
            node = node[part]
        else:
            return f'--{name}.{path}: {seen} is {_kind(node)}, it has no field `{part}`'
        seen = f'{seen}.{part}'
    return None


def _load(fl, value: str):
    """The config ``fl`` loads from ``value`` (path[:variant]), or None when it cannot."""
    try:
        return fl.parser.parse(value)
    except Exception:  # noqa: BLE001 - reported by absl's own error, which we explain
        return None


def explain(e: BaseException, argv: list[str]) -> str | None:
    """One line saying what is wrong with the command line that made parsing raise ``e``, or None
    when ``e`` is not the command line's fault (a bug, which keeps its traceback)."""
    configs = _config_flags()
    text = str(e)
    m = re.match(r'flag --([\w.-]+)=(.*?): (.*)', text, re.S)
    if m and m[1] in configs and 'Error whilst parsing config file' in m[3]:
        last = [ln.strip() for ln in m[3].strip().splitlines() if ln.strip()][-1]
        last = re.sub(r'^(ValueError|TypeError): ', '', last)
        return f'--{m[1]} {m[2]}: {last}'
    if m and m[1].split('.')[0] in configs and '.' in m[1]:
        name, _, path = m[1].partition('.')
        given = dict(_given(argv, name))
        config = _load(configs[name], given.get(name) or '') if given.get(name) else None
        if config is not None:
            try:
                current = config
                for part in path.split('.'):
                    current = current[part]
                return f'--{m[1]}={m[2]}: {name}.{path} takes {_kind(current)}, got {m[2]!r}'
            except (KeyError, TypeError):
                pass
        return f'--{m[1]}={m[2]}: {m[3]}'
    if m and isinstance(e, flags.IllegalFlagValueError):
        kind = {'int': 'an integer', 'float': 'a number'}.get(flags.FLAGS[m[1]].flag_type())
        return f'--{m[1]}={m[2]}: ' + (f'expected {kind}, got {m[2]!r}' if kind else m[3])
    if isinstance(e, flags.Error):
        return text
    for name, fl in configs.items():  # an override of a field the config does not have
        given = _given(argv, name)
        path_arg = dict(given).get(name)
        config = _load(fl, path_arg) if path_arg else None
        for flag, _ in given:
            if flag != name and config is not None:
                why = _field_error(name, config, flag[len(name) + 1:])
                if why:
                    return why
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's ``flags_parser`` for every command: a command-line mistake is one ``error: ...`` line
    and exit status 2 (see the module docstring)."""
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        why = explain(e, argv)
        if why is None:
            raise
        fail(why)
    for name, fl in _config_flags().items():
        value = dict(_given(argv, name)).get(name)
        if value and not os.path.isfile(value.split(':', 1)[0]):
            fail(f'--{name} {value}: no such config file {value.split(":", 1)[0]!r}')
    return rest


def run_main(main) -> None:
    """``app.run`` of ``main`` (wrapped by :func:`guarded`) with :func:`parse_flags`; sets absl
    logging to WARNING (absl raises it to INFO) before ``main`` unless ``--verbosity`` was given."""

    def quiet_main(argv):
        if not flags.FLAGS['verbosity'].present:
            logging.set_verbosity(logging.WARNING)
        return guarded(main)(argv)

    app.run(quiet_main, flags_parser=parse_flags)


def require(*names: str) -> None:
    """Raises app.UsageError ('--a and --b are required') unless every flag ``names`` was given
    a value (guarded turns it into one ``error:`` line, exit status 2)."""
    if any(flags.FLAGS[n].value is None for n in names):
        raise app.UsageError(' and '.join(f'--{n}' for n in names) +
                             (' is' if len(names) == 1 else ' are') + ' required')


# --------------------------------------------------------------------------- progress


class Lines:
    """A loop's progress as one plain line every ``every`` steps, for stdout that is a file or a
    pipe (where a tqdm bar's carriage returns make one line of thousands of characters). Has the
    part of tqdm's interface the commands use: iteration, ``update``, ``set_postfix``, ``close``
    and ``n``."""

    def __init__(self,
                 iterable=None,
                 total=None,
                 desc='',
                 unit='it',
                 initial=0,
                 every=1,
                 disable=False):
        if total is None and hasattr(iterable, '__len__'):
            total = initial + len(iterable)  # as tqdm: the steps still to run, plus those done
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.every, self.disable = max(1, int(every)), disable
        self.postfix, self.t0 = {}, time.time()

    def __iter__(self):
        for x in self.iterable:
            yield x  # the body runs (and sets the postfix) before this step's line
            self.update(1)

    def update(self, n: int = 1) -> None:
        """Counts ``n`` more steps; prints a line when a multiple of ``every`` (or the total) is
        reached."""
        before, self.n = self.n, self.n + n
        if n > 0 and (self.n // self.every > before // self.every or self.n == self.total):
            self.line()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        """The ``key=value`` pairs the next line ends with."""
        del refresh
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def line(self) -> None:
        """Prints ``desc n/total [elapsed, s per unit] key=value ...`` on stdout."""
        if self.disable:
            return
        dt, done = time.time() - self.t0, self.n - self.initial
        of = f'/{self.total}' if self.total else ''
        rate = f', {dt / done:.2f} s/{self.unit}' if done > 0 else ''
        post = ''.join(f' {k}={v}' for k, v in self.postfix.items())
        print(f'{self.desc} {self.n}{of} [{tqdm.format_interval(dt)}{rate}]{post}', flush=True)

    def close(self) -> None:
        """Nothing to tear down (tqdm's ``close`` ends the bar's line)."""


def progress(iterable=None, total=None, desc='', unit='it', initial=0, every=1, disable=False):
    """A tqdm bar on stdout when it is a terminal, else :class:`Lines` (one line every ``every``
    steps). Arguments as tqdm's; ``every`` applies to the plain lines only."""
    if sys.stdout.isatty():
        return tqdm(iterable,
                    total=total,
                    desc=desc,
                    unit=unit,
                    initial=initial,
                    file=sys.stdout,
                    disable=disable)
    return Lines(iterable, total, desc, unit, initial, every, disable)
