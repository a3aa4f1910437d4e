"""The odd-indexed half of the feature-combination matrix (tests/test_combinations.py)."""
import pytest

from test_combinations import case_id, check, combos, toy  # noqa: F401 (toy is a fixture)

pytestmark = pytest.mark.heavy  # every pairing of features, one compiled run each

CASES = combos()[1::2]


@pytest.mark.parametrize('combo', CASES, ids=[case_id(c) for c in CASES])
def test_combination_runs_or_is_refused_in_one_line(combo, toy):  # noqa: F811
    check(combo, toy)
