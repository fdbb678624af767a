import numpy as np
import torch

import anomalens
from anomalens.data.inputs import as_items, iter_batches
from anomalens.models.padim import concat_embedding
from conftest import fast_options


def test_streamed_gaussian_matches_numpy(texture):
    det = anomalens.create("padim", **fast_options("padim")).fit(texture.train)
    n_cal = det.fit_info["n_calibration"]
    # recompute the embeddings of the fit images and compare mean and covariance at one position
    from anomalens.data import calibration_split

    fit_samples, _ = calibration_split(texture.train, fraction=0.1, seed=0)
    assert len(fit_samples) == det.fit_info["n_fit"] and n_cal == len(texture.train) - len(fit_samples)
    embs = []
    for batch in iter_batches(as_items(fit_samples), det._preprocess(), 8):
        embs.append(concat_embedding(det.features(batch.pixels), det.model.channel_idx))
    emb = torch.cat(embs).double().numpy()  # (N, d, h, w)
    pos = emb[:, :, 3, 5]
    p = 3 * emb.shape[3] + 5
    np.testing.assert_allclose(det.model.mean[p].numpy(), pos.mean(0), rtol=1e-4, atol=1e-5)
    # fewer images than features: the regularized covariance is what makes the inverse exist
    cov = np.cov(pos, rowvar=False) + det.options["regularization"] * np.eye(pos.shape[1])
    np.testing.assert_allclose(det.model.inv_cov[p].numpy() @ cov, np.eye(pos.shape[1]), atol=2e-3)


def test_mahalanobis_map_against_numpy():
    from anomalens.models.padim import PadimModel

    rng = np.random.default_rng(0)
    features = [
        torch.from_numpy(rng.normal(size=(2, 3, 4, 4)).astype(np.float32)),
        torch.from_numpy(rng.normal(size=(2, 2, 2, 2)).astype(np.float32)),
    ]
    channel_idx = torch.tensor([0, 2, 4])  # stage 1's channels 0 and 2, stage 2's channel 1
    d, positions = 3, 16
    mean = rng.normal(size=(positions, d)).astype(np.float32)
    a = rng.normal(size=(positions, d, d))
    inv_cov = (a @ a.transpose(0, 2, 1) + np.eye(d)).astype(np.float32)  # symmetric positive definite
    model = PadimModel(channel_idx, torch.from_numpy(mean), torch.from_numpy(inv_cov), 8, sigma=1.0)
    scores, maps = model(features)
    # by hand: stage 2 upsampled (nearest) to stage 1's 4 x 4 grid, the chosen channels, then
    # sqrt((x - mu)' S^-1 (x - mu)) per position
    deep = np.repeat(np.repeat(features[1].numpy(), 2, axis=2), 2, axis=3)
    emb = np.concatenate([features[0].numpy(), deep], axis=1)[:, [0, 2, 4]]
    x = emb.reshape(2, d, positions).transpose(0, 2, 1) - mean[None]
    dist = np.sqrt(np.einsum("bpi,pij,bpj->bp", x, inv_cov, x)).reshape(2, 4, 4)
    up = model.upsample
    expected = np.stack(
        [
            up.matrix(4, torch.device("cpu")).numpy() @ m @ up.matrix(4, torch.device("cpu")).numpy().T
            for m in dist
        ]
    )
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), expected.max(axis=(1, 2)), rtol=1e-5)
