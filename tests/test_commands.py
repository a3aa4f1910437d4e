"""The experiment commands as importable modules: tests and other commands import them for their
functions, so importing one must register no absl flag (two commands defining `--workdir` at
import would make the second import fail with DuplicateFlagError)."""
import importlib
import pkgutil
import subprocess
import sys

import pytest
from absl import flags

import experiments


def test_importing_every_command_registers_no_flags():
    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)]
    assert {'train', 'grid', 'export', 'compare', 'bench_backbone'} <= set(names)
    for name in names:
        importlib.import_module(f'experiments.{name}')
    ours = [
        m for m in flags.FLAGS.flags_by_module_dict()
        if m.split('.')[0] in ('experiments', 'fedgen')
    ]
    assert ours == []
    assert not {'workdir', 'grid', 'out', 'config', 'client'} & set(flags.FLAGS)


@pytest.mark.parametrize('name,flag', [('grid', '--grid'), ('export', '--merged'),
                                       ('bench_backbone', '--ce_chunk')])
def test_a_command_run_as_a_program_defines_its_flags(name, flag):
    out = subprocess.run([sys.executable, '-m', f'experiments.{name}', '--help'],
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert flag in out.stdout  # absl prints the usage and exits 1 on --help
