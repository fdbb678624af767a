import pytest
import torch
import torch.nn.functional as F

from anomalens.models.components.layers import SmoothUpsample, _gaussian_kernel


def upsample_then_blur(patch_maps, size, sigma):
    """The textbook two steps: bilinear upsampling, then a reflect-padded 2-D Gaussian."""
    k, r = _gaussian_kernel(sigma)
    k = k.float()
    m = F.interpolate(patch_maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    m = F.pad(m, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(m, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))[:, 0]


@pytest.mark.parametrize("h,w,size,sigma", [(32, 32, 256, 4.0), (8, 12, 64, 4.0), (16, 16, 128, 2.0)])
def test_matrix_form_equals_upsample_then_blur(h, w, size, sigma):
    maps = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    ours = SmoothUpsample(size, sigma)(maps)
    assert ours.shape == (3, size, size)
    torch.testing.assert_close(ours, upsample_then_blur(maps, size, sigma), atol=1e-5, rtol=1e-5)


def test_constant_map_stays_constant():
    out = SmoothUpsample(40, 4.0)(torch.full((1, 5, 5), 2.5))  # blur wider than the map: tails clipped
    torch.testing.assert_close(out, torch.full((1, 40, 40), 2.5))
