"""The CI rule of tests/conftest.py: under CI=true a skipped test (or a module skipped at import,
as ``pytest.importorskip`` of a missing wheel does) fails the run; without CI it is a skip."""
import os
import shutil
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(__file__), 'conftest.py')


def _pytest(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'CI'}
    if ci:
        env['CI'] = 'true'
    return subprocess.run([
        sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
        str(tmp_path)
    ],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)


def _both(tmp_path, source: str) -> tuple:
    """(run with CI=true, run without CI) of one test file ``source`` beside our conftest."""
    shutil.copy(CONFTEST, tmp_path / 'conftest.py')
    (tmp_path / 'test_case.py').write_text(source)
    return _pytest(tmp_path, ci=True), _pytest(tmp_path, ci=False)


def test_skips_fail_under_ci_and_pass_quietly_without(tmp_path):
    ci, local = _both(
        tmp_path, 'import pytest\n\n\ndef test_needs_wheel():\n'
        "    pytest.importorskip('fedgen_no_such_wheel')\n\n\ndef test_runs():\n    pass\n")
    assert ci.returncode == 1, ci.stdout
    assert '1 failed, 1 passed' in ci.stdout
    assert 'skipped under CI=true' in ci.stdout and 'fedgen_no_such_wheel' in ci.stdout
    assert local.returncode == 0, local.stdout
    assert '1 passed, 1 skipped' in local.stdout


def test_module_level_skip_fails_under_ci(tmp_path):
    ci, local = _both(
        tmp_path, "import pytest\n\npytest.importorskip('fedgen_no_such_wheel')\n\n\n"
        'def test_never_collected():\n    pass\n')
    assert ci.returncode != 0, ci.stdout
    assert 'skipped under CI=true' in ci.stdout
    assert local.returncode == 5 and '1 skipped' in local.stdout, local.stdout  # 5: none ran
