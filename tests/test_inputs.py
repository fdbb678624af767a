import numpy as np
import pytest
import torch

import anomalens
from anomalens.data.inputs import Preprocess, adjust_intensity, as_items


def test_standardize_maps_any_exposure_to_the_same_image():
    rng = np.random.default_rng(0)
    img = rng.random((20, 30)).astype(np.float32)
    dark = img * 0.1 + 0.02  # same part, under-exposed
    a, b = adjust_intensity(img, "standardize"), adjust_intensity(dark, "standardize")
    assert a.mean() == pytest.approx(0.5, abs=1e-5) and a.std() == pytest.approx(0.2, abs=1e-4)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_stretch_maps_percentiles_to_the_full_range():
    img = np.linspace(0.2, 0.3, 1000, dtype=np.float32).reshape(20, 50)
    out = adjust_intensity(img, "stretch")
    assert np.percentile(out, 1) == pytest.approx(0.0, abs=1e-5) and np.percentile(out, 99) == pytest.approx(
        1.0
    )
    assert out.min() < 0.0 < 1.0 < out.max()  # the extremes keep their contrast
    assert adjust_intensity(np.full((4, 4), 0.3, np.float32), "stretch").shape == (4, 4)  # flat image: no NaN


def test_unknown_intensity_mode_is_rejected():
    with pytest.raises(ValueError, match="intensity"):
        anomalens.create("patchcore", intensity="auto")


def test_preprocess_makes_three_channels_from_grayscale_and_normalizes():
    pre = Preprocess(16, 3, (0.5,) * 3, (0.5,) * 3)
    out = pre(np.full((10, 40), 1.0, dtype=np.float32))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, torch.ones(3, 16, 16))


def test_as_items_reads_folders_recursively_and_stacks(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "a" / "1.png")
    Image.new("L", (8, 8)).save(tmp_path / "a" / "b" / "2.png")
    assert len(as_items(tmp_path)) == 2
    assert len(as_items(np.zeros((3, 8, 8)))) == 3  # an (N, H, W) stack is N images
    with pytest.raises(TypeError, match="cannot use"):
        as_items([object()])
