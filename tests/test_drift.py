"""Drift check: statistics of one image, the training goods' profile, flags and their serialisation.

The goods are one fixed scene (smooth blobs) with the variation an inspection camera sees: a small
brightness jitter, sensor noise and a shift of a few pixels. Every test image is made from it with numpy.
"""

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from anomalens.data.drift import DriftProfile, image_statistics, thumbnail

SIZE = 64


def _scene(seed: int = 7, shape: tuple[int, int] = (SIZE + 8, 1008)) -> np.ndarray:
    """Smooth blobs in [0.2, 0.6], larger than the images so shifted (and wider) crops stay inside."""
    blobs = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 5)
    return 0.2 + 0.4 * (blobs - blobs.min()) / (blobs.max() - blobs.min())


SCENE = _scene()


def good(rng: np.random.Generator, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    dy, dx = rng.integers(0, 5, size=2)
    noise = rng.normal(0, 0.02, (height, width))
    image = SCENE[dy : dy + height, dx : dx + width] + rng.uniform(-0.03, 0.03) + noise
    return np.clip(image, 0, 1).astype(np.float32)


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.clip(gray[..., None] * np.array([1.1, 1.0, 0.8]), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def profile() -> DriftProfile:
    rng = np.random.default_rng(0)
    return DriftProfile.fit([image_statistics(good(rng)) for _ in range(40)])


def flagged(profile: DriftProfile, image: np.ndarray) -> dict:
    return {f.statistic: f for f in profile.check(image_statistics(image))}


def test_statistics_of_a_known_image():
    image = np.full((30, 60), 0.5, dtype=np.float32)
    image[:, 30:] = 1.0
    stats = image_statistics(image)
    assert (stats["height"], stats["width"], stats["aspect"], stats["channels"]) == (30, 60, 2.0, 1)
    assert stats["mean"] == pytest.approx(0.75 * 255)
    assert stats["std"] == pytest.approx(0.25 * 255)
    assert stats["sharpness"] > 0
    assert stats["embedding"].shape == (16, 16)
    colour = image_statistics(np.stack([image, image * 0.5, np.zeros_like(image)], axis=-1))
    assert colour["mean_r"] == pytest.approx(0.75 * 255) and colour["mean_g"] == pytest.approx(0.375 * 255)
    assert colour["std_b"] == 0 and colour["embedding"].shape == (16, 16, 3)
    assert "mean_r" not in stats


def test_thumbnail_is_an_exact_area_average():
    image = np.random.default_rng(1).random((48, 80, 3)).astype(np.float32)
    blocks = image.reshape(16, 3, 16, 5, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(thumbnail(image), blocks, atol=1e-6)
    np.testing.assert_allclose(thumbnail(image[..., 1]), blocks[..., 1], atol=1e-6)
    # sizes that do not divide evenly (or are smaller than the thumbnail) keep the mean
    odd = image[:7, :37, 0]
    assert thumbnail(odd).mean() == pytest.approx(odd.mean(), abs=1e-6)


def test_goods_from_the_same_distribution_are_not_flagged(profile):
    rng = np.random.default_rng(100)
    flags = [f.message for _ in range(30) for f in profile.check(image_statistics(good(rng)))]
    assert flags == []


def test_brighter_image_is_flagged_with_mean_and_range(profile):
    image = good(np.random.default_rng(1)) + 0.25
    flag = flagged(profile, image)["mean"]
    low, high = profile.ranges["mean"]
    assert flag.value > high and (flag.low, flag.high) == (low, high)
    pattern = r"brighter than every training good: mean \d+ vs \d+-\d+ \(0-255 scale\)"
    assert re.fullmatch(pattern, flag.message)
    assert f"mean {flag.value:.0f} vs {low:.0f}-{high:.0f}" in flag.message
    assert flag.excess == pytest.approx((flag.value - high) / (high - low))
    assert "darker" in flagged(profile, good(np.random.default_rng(1)) - 0.2)["mean"].message


def test_margin_rule_is_a_share_of_the_range_plus_a_floor(profile):
    low, high = profile.ranges["mean"]
    limit = high + profile.margin * (high - low) + 2.0  # the floor for intensities: 2 grey levels
    stats = image_statistics(good(np.random.default_rng(2)))
    assert "mean" not in {f.statistic for f in profile.check({**stats, "mean": limit - 0.01})}
    assert "mean" in {f.statistic for f in profile.check({**stats, "mean": limit + 0.01})}


def test_blurred_copy_is_flagged_as_blurrier(profile):
    image = good(np.random.default_rng(3))
    assert flagged(profile, image) == {}
    flag = flagged(profile, ndimage.gaussian_filter(image, 1.5))["sharpness"]
    assert flag.value < flag.low
    assert flag.message.startswith("blurrier than every training good: sharpness")


def test_other_size_is_flagged_and_the_training_size_is_not(profile):
    rng = np.random.default_rng(4)
    wider = flagged(profile, good(rng, SIZE, SIZE + 6))
    assert {"width", "aspect"} <= set(wider) and "height" not in wider
    assert wider["width"].message.startswith("larger than every training good: 70x64 px vs 64x64 px")
    assert "smaller" in flagged(profile, good(rng, SIZE - 1, SIZE))["height"].message
    assert not {"width", "height", "aspect"} & set(flagged(profile, good(rng)))


def test_sizes_within_the_goods_range_are_not_flagged():
    rng = np.random.default_rng(5)
    sizes = [(48, 48), (56, 60), (64, 64), (60, 52)]
    goods = DriftProfile.fit([image_statistics(good(rng, h, w)) for h, w in sizes * 5])
    assert not {"width", "height"} & set(flagged(goods, good(rng, 52, 56)))
    assert "width" in flagged(goods, good(rng, 52, 1000))


def test_other_scene_is_flagged_by_the_embedding(profile):
    image = good(np.random.default_rng(6))
    stripes = (np.arange(SIZE) // 8 % 2).astype(np.float32)[None, :].repeat(SIZE, axis=0)
    # same mean and spread as the good, so only the layout differs
    stripes = (stripes - stripes.mean()) / stripes.std() * image.std() + image.mean()
    stripes = ndimage.gaussian_filter(stripes, 1.0) + np.random.default_rng(6).normal(0, 0.02, stripes.shape)
    flags = flagged(profile, stripes.astype(np.float32))
    assert "mean" not in flags
    assert flags["embedding"].message.startswith("unlike every training good: distance to the nearest good")
    assert flags["embedding"].value > flags["embedding"].high > 0
    assert "embedding" not in flagged(profile, image)


def test_rgb_goods_and_a_colour_cast():
    rng = np.random.default_rng(8)
    colour = DriftProfile.fit([image_statistics(rgb(good(rng))) for _ in range(30)])
    assert "mean_r" in colour.ranges and colour.thumbnails.shape[1:] == (16, 16, 3)
    assert flagged(colour, rgb(good(rng))) == {}
    redder = rgb(good(rng))
    redder[..., 0] += 0.15
    assert flagged(colour, redder)["mean_r"].message.startswith("brighter in red than every training good")
    grey = flagged(colour, good(rng))
    assert grey["channels"].message == "grayscale, every training good is RGB"


def test_grayscale_profile_checks_an_rgb_image(profile):
    flags = flagged(profile, rgb(good(np.random.default_rng(9))))
    assert flags["channels"].message == "RGB, every training good is grayscale"
    assert all(math.isfinite(f.value) for f in flags.values())


def test_16_bit_images_give_the_8_bit_statistics_and_flags():
    rng = np.random.default_rng(10)
    eight = [np.round(good(rng) * 255).astype(np.uint8) for _ in range(30)]
    sixteen = [(im.astype(np.uint16) * 257 / 65535).astype(np.float32) for im in eight]  # as read_image does
    stats8 = image_statistics((eight[0] / 255).astype(np.float32))
    stats16 = image_statistics(sixteen[0])
    for key in ("mean", "std", "sharpness"):
        assert stats16[key] == pytest.approx(stats8[key], rel=1e-5)
    deep = DriftProfile.fit([image_statistics(im) for im in sixteen[1:]])
    assert deep.check(stats16) == []
    assert "mean" in {f.statistic for f in deep.check(image_statistics(sixteen[0] * 1.5))}


def test_serialisation_round_trips_exactly(profile, tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays, meta = profile.to_arrays_and_meta()
    save_file(arrays, tmp_path / "drift.safetensors")
    restored = DriftProfile.from_arrays_and_meta(
        load_file(tmp_path / "drift.safetensors"), json.loads(json.dumps(meta))
    )
    arrays2, meta2 = restored.to_arrays_and_meta()
    assert meta2 == meta and arrays2.keys() == arrays.keys()
    for key in arrays:
        assert arrays2[key].dtype == arrays[key].dtype
        np.testing.assert_array_equal(arrays2[key], arrays[key])
    rng = np.random.default_rng(11)
    for image in (good(rng), good(rng) + 0.3, ndimage.gaussian_filter(good(rng), 2)):
        assert restored.check(image_statistics(image)) == profile.check(image_statistics(image))


def test_thumbnails_are_capped_by_a_seeded_subset():
    rng = np.random.default_rng(12)
    goods = [image_statistics(good(rng)) for _ in range(12)]
    capped = DriftProfile.fit(goods, max_thumbnails=5, seed=3)
    assert capped.thumbnails.shape == (5, 16, 16) and capped.nn_distances.shape == (5,)
    assert capped.n_goods == 12
    again = DriftProfile.fit(goods, max_thumbnails=5, seed=3)
    np.testing.assert_array_equal(capped.thumbnails, again.thumbnails)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shape"):
        image_statistics(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        image_statistics(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="at least one"):
        DriftProfile.fit([])


_sides = st.integers(1, 24)
_images = hnp.arrays(
    np.float32,
    st.tuples(_sides, _sides) | st.tuples(_sides, _sides, st.just(3)),
    elements=st.floats(0, 1, width=32),
)


@settings(max_examples=60, deadline=None)
@given(goods=st.lists(_images, min_size=1, max_size=4), image=_images)
def test_check_never_raises_and_returns_finite_numbers(goods, image):
    profile = DriftProfile.fit([image_statistics(g) for g in goods])
    for flag in profile.check(image_statistics(image)):
        assert all(math.isfinite(x) for x in (flag.value, flag.low, flag.high, flag.excess))
        assert flag.excess > 0 and flag.message and "\n" not in flag.message
