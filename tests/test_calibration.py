import numpy as np
import pytest

from anomalens.thresholds import calibrate


def test_threshold_is_the_quantile_and_normalizes_to_one():
    scores = np.arange(1.0, 101.0)
    cal = calibrate(scores, quantile=0.95)
    assert cal.threshold == pytest.approx(np.quantile(scores, 0.95))
    assert cal.center == pytest.approx(50.5)
    assert cal.normalize(np.array([cal.center, cal.threshold])) == pytest.approx([0.0, 1.0])


def test_pixel_threshold_from_map_peaks():
    maps = [np.full((4, 4), v, dtype=np.float32) for v in (1.0, 2.0, 3.0)]
    maps[2][0, 0] = 10.0
    cal = calibrate(np.array([1.0, 2.0, 10.0]), maps, quantile=1.0)
    assert cal.pixel_threshold == 10.0
    assert cal.normalize_map(np.array([[10.0]], dtype=np.float32))[0, 0] == pytest.approx(1.0)


def test_identical_scores_do_not_divide_by_zero():
    cal = calibrate(np.ones(5))
    assert np.isfinite(cal.normalize(np.array([1.0, 2.0]))).all()


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_quantile_is_checked(bad):
    with pytest.raises(ValueError, match="quantile"):
        calibrate(np.ones(3), quantile=bad)


def test_needs_scores():
    with pytest.raises(ValueError, match="at least one"):
        calibrate(np.array([]))
