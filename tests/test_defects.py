"""Tests for anomalens.data.defects: exact masks on every dtype and layout, seeded determinism, the
controls (area, width, contrast) and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from anomalens.data.defects import KINDS, DefectSynthesizer, perlin_mask, perlin_noise
from anomalens.data.synthetic import synthetic_image


def _goods(dtype: str, channels: int, shape: tuple[int, int] = (72, 90), n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    goods = []
    for _ in range(n):
        image = synthetic_image("texture", max(shape), channels, rng)[: shape[0], : shape[1]]
        if dtype == "uint8":
            image = np.rint(image * 255).astype(np.uint8)
        elif dtype == "uint16":  # 12-bit data in a 16-bit container
            image = np.rint(image * 4095).astype(np.uint16)
        else:
            image = image.astype(dtype)
        goods.append(image)
    return goods


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "channels"), [("uint8", 1), ("uint8", 3), ("uint16", 1), ("float32", 3), ("float64", 1)]
)
def test_mask_is_exactly_the_changed_pixels(kind: str, dtype: str, channels: int) -> None:
    goods = _goods(dtype, channels)
    synth = DefectSynthesizer([kind], seed=3)
    for i in range(4):
        image, source = goods[i % 3], goods[(i + 1) % 3] if i % 2 else None
        before = image.copy()
        out, mask = synth.make(image, source)
        np.testing.assert_array_equal(image, before)  # the input is never modified
        assert out.dtype == image.dtype and out.shape == image.shape
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        changed = out != image
        changed = changed.any(axis=2) if changed.ndim == 3 else changed
        np.testing.assert_array_equal(mask, changed)
        assert 0 < mask.mean() < 0.5
        if dtype.startswith("float"):
            assert out.min() >= 0 and out.max() <= 1


def test_gray_with_a_channel_axis_and_colour_source() -> None:
    gray = _goods("uint8", 1)[0][..., None]
    colour = _goods("uint8", 3, shape=(40, 50))[1]  # another size and layout: resized and converted
    out, mask = DefectSynthesizer(["nsa"], seed=0).make(gray, colour)
    assert out.shape == gray.shape
    np.testing.assert_array_equal(mask, (out != gray)[..., 0])


def test_seeded_and_deterministic() -> None:
    goods = _goods("uint8", 3)
    first = DefectSynthesizer(seed=7).make_many(goods, 12)
    again = DefectSynthesizer(seed=7).make_many(goods, 12)
    other = DefectSynthesizer(seed=8).make_many(goods, 12)
    for (a, ma), (b, mb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    assert any(not np.array_equal(ma, mb) for (_, ma), (_, mb) in zip(first, other))
    np.testing.assert_array_equal(perlin_mask((50, 70), 4), perlin_mask((50, 70), np.random.default_rng(4)))


def test_make_many_uses_every_kind_and_other_goods_as_sources() -> None:
    goods = _goods("float32", 1, n=4)
    results = DefectSynthesizer(seed=0).make_many(goods, 30)
    assert len(results) == 30
    # each result differs from exactly one good outside its mask: the one it was made on
    for out, mask in results:
        bases = [g for g in goods if np.array_equal(out[~mask], g[~mask])]
        assert len(bases) == 1


def test_perlin_mask_and_noise() -> None:
    rng = np.random.default_rng(1)
    masks = [perlin_mask((64, 96), rng) for _ in range(40)]
    assert all(m.dtype == bool and m.shape == (64, 96) for m in masks)
    shares = np.array([m.mean() for m in masks])
    assert (shares > 0).mean() > 0.3 and shares.max() < 0.6  # DRAEM's masks: often some, never most
    noise = perlin_noise((33, 47), 0, (3, 5), angle=30)
    assert noise.shape == (33, 47) and noise.dtype == np.float32
    assert 0.05 < noise.std() < 0.6 and np.abs(noise).max() <= 1.5
    # smooth: neighbouring pixels differ far less than the field varies
    assert np.abs(np.diff(noise, axis=1)).mean() < 0.5 * noise.std()
    with pytest.raises(ValueError, match="scale_range"):
        perlin_mask((8, 8), 0, scale_range=(3, 3))


def test_scratch_width_and_spot_area_and_contrast_follow_the_settings() -> None:
    image = np.full((128, 128), 100, np.uint8)
    thin = DefectSynthesizer(["scratch"], seed=0, scratch_width=(1, 1), contrast=(0.5, 0.5))
    thick = DefectSynthesizer(["scratch"], seed=0, scratch_width=(5, 5), contrast=(0.5, 0.5))
    thin_out, thin_mask = thin.make(image)
    _, thick_mask = thick.make(image)
    # same path (same seed): the thick one covers several times the thin one's pixels
    assert 3 < thick_mask.sum() / thin_mask.sum() < 7
    # a constant image has no span of its own: contrast is a fraction of a tenth of the nominal range
    np.testing.assert_array_equal(np.unique(thin_out[thin_mask]), [100 + round(0.5 * 25.5)])
    spot = DefectSynthesizer(["spot"], seed=0, area=(0.02, 0.02))
    areas = [spot.make(image)[1].mean() for _ in range(5)]
    np.testing.assert_allclose(areas, 0.02, rtol=0.15)


def test_dark_defects_on_bright_parts() -> None:
    bright = np.full((64, 64), 0.9, np.float32)
    bright[0, 0] = 0.0  # a span of 0.9: a brighter spot would not fit under 1
    synth = DefectSynthesizer(["spot"], seed=0, contrast=(0.3, 0.5))
    for _ in range(5):
        out, mask = synth.make(bright)
        assert (out[mask] < 0.9).all()
    white = np.full((64, 64), 255, np.uint8)
    out, mask = DefectSynthesizer(["scratch"], seed=0).make(white)
    assert mask.any() and (out[mask] < 255).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.make(np.zeros((8, 8), np.uint8)), "at least 16"),
        (lambda s: s.make(np.zeros((32, 32, 2), np.uint8)), "shape"),
        (lambda s: s.make(np.zeros((32, 32), np.int32)), "uint8, uint16"),
        (lambda s: s.make(np.full((32, 32), np.nan, np.float32)), "NaN"),
        (lambda s: s.make(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint16)), "source must have"),
        (lambda s: s.make(np.zeros((32, 32), np.uint8), kind="dent"), "unknown defect kind"),
        (lambda s: s.make_many([], 3), "at least one"),
        (lambda s: DefectSynthesizer(["dent"]), "unknown defect kind"),
        (lambda s: DefectSynthesizer(area=(0.2, 0.1)), "area"),
    ],
)
def test_bad_input_is_named(call, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        call(DefectSynthesizer(seed=0))
