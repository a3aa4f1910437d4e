"""What a user sees on the command line (experiments/console.py): a command-line mistake is one
``error: ...`` line on stderr and exit status 2 in every command that takes --config; progress on
a pipe is one plain line per round; experiments.export is quiet, writes readable files and
refuses a bad --workdir in one line; one machine line; constraints.txt pins setup.cfg's
dependencies."""
import configparser
import os
import re
import stat
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import ptb_fedgen_edge
from experiments import console
from experiments import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/ptb_fedgen_edge.py'

TYPO = (['--config', f'{CONFIG}:tiny', '--config.fed.roundz=3'], 'did you mean `rounds`')
NOT_A_NUMBER = (['--config', f'{CONFIG}:tiny',
                 '--config.fed.rounds=abc'], "config.fed.rounds takes an integer, got 'abc'")
VARIANT = (['--config', f'{CONFIG}:gpu'], 'config argument must be "" or "tiny"')
NO_FILE = (['--config', 'configs/ptb_fedgen_edgee.py:tiny'], 'no such config file')


def run(module: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, with a 300 s limit."""
    return subprocess.run([sys.executable, '-m', module] + args,
                          capture_output=True,
                          text=True,
                          timeout=300,
                          cwd=REPO,
                          **kw)


def assert_one_line_error(out: subprocess.CompletedProcess, says: str) -> None:
    """Exit status 2 and a single stderr line ``error: ...`` containing ``says``."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-3000:]
    assert says in lines[0], lines[0]
    assert 'Traceback' not in out.stderr + out.stdout and 'FATAL' not in out.stderr


# train: every case; the other --config commands: one case each (each call imports jax afresh).
@pytest.mark.parametrize('module,case', [
    ('experiments.train', TYPO),
    ('experiments.train', NOT_A_NUMBER),
    ('experiments.train', VARIANT),
    ('experiments.sweep', NOT_A_NUMBER),
    ('experiments.personalize', TYPO),
    ('experiments.deploy', VARIANT),
])
def test_a_config_mistake_is_one_line_and_exit_2(module, case, tmp_path):
    args, says = case
    extra = ['--clients=2'] if module == 'experiments.deploy' else []
    out = run(module, args + ['--workdir', str(tmp_path / 'w')] + extra)
    assert_one_line_error(out, says)
    assert not (tmp_path / 'w').exists()  # nothing ran


def test_parse_flags_names_the_section_the_type_and_the_file(monkeypatch, capsys):
    """In-process, the cases not run as programs above: each is one line and exit status 2."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'c', flag_values=fv)
    flags.DEFINE_integer('epochs', 1, 'e', flag_values=fv)
    monkeypatch.setattr(flags, 'FLAGS', fv)
    for argv, says in [
        (['p', '--config', f'{CONFIG}:tiny', '--config.fedd.rounds=3'],
         '--config.fedd.rounds: config has no field `fedd`; did you mean `fed`?'),
        (['p', f'--config={CONFIG}:tiny',
          '--config.fed.rounds.x=1'], 'config.fed.rounds is an integer, it has no field `x`'),
        (['p', f'--config={CONFIG}:tiny',
          '--config.lora.alpha=zz'], "config.lora.alpha takes a number, got 'zz'"),
        (['p', f'--config={CONFIG}:tiny', '--config.fed.zzzzzz=1'], 'its fields: aggregator,'),
        (['p', '--epochs=x'], "--epochs=x: expected an integer, got 'x'"),
        (['p', '--epochz=1'], 'Did you mean: epochs'),
        (['p'] + NO_FILE[0], NO_FILE[1]),
    ]:
        monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads its overrides from sys.argv
        fv.unparse_flags()
        with pytest.raises(SystemExit) as e:
            console.parse_flags(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), (argv, err)
        assert says in err[0], (argv, err)
    argv = ['p', f'--config={CONFIG}:tiny', '--config.fed.rounds=7']
    monkeypatch.setattr(sys, 'argv', argv)
    fv.unparse_flags()
    assert console.parse_flags(argv) == ['p'] and fv.config.fed.rounds == 7


def test_progress_on_a_pipe_is_one_line_per_round(capsys):
    bar = console.progress(range(2, 6), total=6, initial=2, desc='rounds', unit='round')
    assert isinstance(bar, console.Lines)  # pytest's captured stdout is not a terminal
    for rnd in bar:
        bar.set_postfix({'loss': f'{1 / (rnd + 1):.3f}'})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ['3/6', '4/6', '5/6', '6/6']
    assert all(ln.startswith('rounds ') and 's/round' in ln for ln in lines)
    assert lines[-1].endswith('loss=0.167')


def test_progress_every_k_and_jumps(capsys):
    bar = console.progress(total=100, desc='pretrain', unit='step', every=25)
    for done in (10, 30, 40, 60, 100):  # pretrain.train reports segments of steps
        bar.update(done - bar.n)
    assert [ln.split()[1]
            for ln in capsys.readouterr().out.splitlines()] == ['30/100', '60/100', '100/100']


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    bar = console.progress(range(3), total=3, desc='rounds', disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


def test_progress_of_a_train_like_program_piped_to_a_file(tmp_path):
    """A program's stdout redirected to a file: one line per round, no carriage return."""
    script = ('from experiments import console\n'
              'bar = console.progress(range(5), desc="rounds", unit="round")\n'
              'for r in bar:\n'
              '    console.log(f"note {r}") if r == 2 else None\n'
              '    bar.set_postfix({"loss": r})\n')
    with open(tmp_path / 'out.txt', 'w') as f:
        subprocess.run([sys.executable, '-c', script], stdout=f, cwd=REPO, timeout=120, check=True)
    text = (tmp_path / 'out.txt').read_text()
    assert '\r' not in text
    rounds = [ln for ln in text.splitlines() if ln.startswith('rounds ')]
    assert [ln.split()[1] for ln in rounds] == ['1/5', '2/5', '3/5', '4/5', '5/5']
    assert 'note 2' in text.splitlines()


def _tiny_run(work) -> None:
    """A run directory export can read: config.json, a local GPT backbone, a round-1 state."""
    from fedgen.fl import algorithm as base
    from fedgen.io import checkpoint
    from fedgen.lora import adapters as lora
    from fedgen.models import gpt
    cfg = gpt.GPTConfig(vocab_size=29, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    checkpoint.save_tree(str(work / 'bb'), params)
    c = ptb_fedgen_edge.get_config('tiny')  # a whole run config, as experiments.train writes it
    c.model.update(n_positions=8, n_embd=16, n_layer=1, n_head=2)
    c.lora.update(alpha=16.0, rank=2)
    c.pretrain.backbone_path = str(work / 'bb')
    c.checkpoint.keep = 2
    (work / 'config.json').write_text(c.to_json_best_effort(indent=1))
    trainable = {'lora': lora.init(jax.random.PRNGKey(1), params, 'qv', 2)}
    state = base.ServerState(round=np.int32(1),
                             trainable=trainable,
                             opt_state=optax.sgd(1.0).init(trainable),
                             rng=jax.random.PRNGKey(0))
    mngr = checkpoint.manager(str(work), 2)
    checkpoint.save(mngr, 1, state=state)
    checkpoint.wait(mngr)


def test_export_is_quiet_readable_and_refuses_a_bad_workdir(tmp_path):
    work = tmp_path / 'run'
    work.mkdir()
    _tiny_run(work)
    mask = os.umask(0o022)  # the child's umask: the usual one
    try:
        out = run('experiments.export', ['--workdir', str(work), '--out', str(tmp_path / 'peft')])
    finally:
        os.umask(mask)
    assert out.returncode == 0, out.stderr[-3000:]
    said = (out.stdout + out.stderr).strip().splitlines()
    assert len(said) == 1 and said[0].startswith('PEFT LoRA (global, round 1'), said[:30]
    for name in ('adapter_model.safetensors', 'adapter_config.json'):
        assert stat.S_IMODE(os.stat(tmp_path / 'peft' / name).st_mode) == 0o644, name

    bad = run('experiments.export', ['--workdir', str(work) + 'x', '--out', str(tmp_path / 'o')])
    assert_one_line_error(bad, 'no such directory')
    assert not (tmp_path / 'o').exists()


def test_one_machine_line_everywhere():
    from experiments import (bench_backbone, bench_padding, bench_residuals, bench_round,
                             bench_step, bench_sweep, report)
    line = machine.machine()
    assert re.match(r'.+, \d+ logical cores, \w+ \w+, Python [\d.]+, jax [\d.]+, \d+ x \w+ ', line)
    assert bench_round.machine is bench_backbone.machine is bench_step.machine is machine.machine
    assert bench_padding.machine is bench_sweep.machine is machine.machine
    assert bench_residuals.machine is machine.machine
    assert report.machine().startswith(line)
    if os.path.exists('/proc/cpuinfo'):
        assert machine.cpuinfo()['names'] and machine.cpu() in line


def test_constraints_pin_every_dependency_of_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, 'setup.cfg'))
    wanted = cfg['options']['install_requires'].split() + cfg['options.extras_require'][
        'test'].split() + cfg['options.extras_require']['interop'].split()
    names = {
        re.split(r'[<>=!~ ]', w)[0].lower().replace('_', '-')
        for w in wanted if w[0].isalpha()
    }
    with open(os.path.join(REPO, 'constraints.txt')) as f:
        pins = dict(
            ln.split('#')[0].strip().lower().split('==') for ln in f if ln.split('#')[0].strip())
    assert names <= set(pins), names - set(pins)
    assert all(re.fullmatch(r'\d+(\.\d+)*', v) for v in pins.values()), pins
    assert 'pip install -e ".[test]" -c constraints.txt' in open(
        os.path.join(REPO, 'constraints.txt')).read()
