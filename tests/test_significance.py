"""The benchmarks' paired t-test against SciPy's (a dev extra), and its edge cases."""

import math

import pytest

from benchmarks.significance import p_text, paired_t_p, student_t_two_sided_p


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 9, 10, 29])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.0, 2.776, 4.5, 12.0, -3.1])
def test_student_t_p_matches_scipy(t, df):
    stats = pytest.importorskip("scipy.stats")
    assert student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)


def test_paired_t_p_matches_scipys_paired_test():
    stats = pytest.importorskip("scipy.stats")
    fedmae = [0.755, 0.761, 0.749, 0.758, 0.752]
    baseline = [0.764, 0.763, 0.760, 0.761, 0.765]
    diffs = [a - b for a, b in zip(fedmae, baseline, strict=True)]
    assert paired_t_p(diffs) == pytest.approx(stats.ttest_rel(fedmae, baseline).pvalue, rel=1e-9)


def test_paired_t_p_edge_cases():
    assert paired_t_p([0.01]) is None  # one seed: no test
    assert paired_t_p([0.02, 0.02, 0.02]) == 0.0  # no spread, nonzero mean
    assert paired_t_p([0.0, 0.0]) == 1.0
    assert paired_t_p([0.01, -0.01]) == pytest.approx(1.0)
    assert student_t_two_sided_p(math.inf, 4) == 0.0
    with pytest.raises(ValueError, match="positive integer"):
        student_t_two_sided_p(1.0, 0)
    assert [p_text(p) for p in (None, 0.0004, 0.0421, 0.5)] == ["-", "< 0.001", "0.042", "0.5"]
