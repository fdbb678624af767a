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
