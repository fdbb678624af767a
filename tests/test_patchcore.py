import numpy as np
import pytest
import torch

import anomalens
from anomalens.models.patchcore import greedy_coreset
from conftest import fast_options


def test_greedy_coreset_picks_distinct_points_and_covers_better_than_random():
    gen = torch.Generator().manual_seed(0)
    # clustered data: a good coreset visits every cluster, a random subset misses small ones
    centers = torch.randn(20, 16, generator=gen) * 10
    sizes = [500] + [5] * 19
    x = torch.cat([c + torch.randn(n, 16, generator=gen) * 0.1 for c, n in zip(centers, sizes)])
    idx = greedy_coreset(x, 20, projection_dim=0, seed=0)
    assert len(set(idx.tolist())) == 20

    def radius(sel):
        return torch.cdist(x, x[sel]).min(dim=1).values.max()

    random_sel = torch.randperm(len(x), generator=gen)[:20]
    assert radius(idx) < 1.0 < radius(random_sel)


def test_coreset_of_everything_is_everything():
    assert greedy_coreset(torch.randn(10, 4), 50, 0, 0).tolist() == list(range(10))


@pytest.mark.parametrize("top_k", [0, 5])
def test_faiss_search_matches_the_pure_torch_model(texture, top_k):
    det = anomalens.create("patchcore", **fast_options("patchcore"), top_k=top_k).fit(texture.train)
    from anomalens.data.inputs import as_items, iter_batches

    batch = next(iter_batches(as_items(texture.test), det._preprocess(), 8))
    fast_scores, fast_maps = det._score_batch(batch.pixels)
    with torch.inference_mode():
        ref_scores, ref_maps = det.model(det.features(batch.pixels))
    np.testing.assert_allclose(fast_scores, ref_scores.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast_maps, ref_maps.numpy(), rtol=1e-4, atol=1e-4)


def test_memory_bank_size_follows_ratio_and_floor(texture):
    opts = {**fast_options("patchcore"), "coreset_ratio": 0.1, "coreset_min_size": 10, "chunk_patches": 512}
    det = anomalens.create("patchcore", **opts).fit(texture.train)
    n_patches = det.fit_info["n_patches"]
    assert n_patches == det.fit_info["n_fit"] * 8 * 8  # 64 px at stride 8
    assert det.fit_info["memory_bank"] == int(np.ceil(0.1 * n_patches))
    det = anomalens.create("patchcore", **{**opts, "coreset_min_size": 100000}).fit(texture.train)
    assert det.fit_info["memory_bank"] == n_patches  # the floor keeps every patch of a tiny set


def test_fit_is_deterministic(texture):
    a = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    b = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    assert torch.equal(a.model.memory_bank, b.model.memory_bank)


def test_top_k_score_is_the_mean_of_the_highest_patch_distances(texture):
    det = anomalens.create("patchcore", **fast_options("patchcore"), top_k=3).fit(texture.train)
    from anomalens.data.inputs import as_items, iter_batches
    from anomalens.models.components.features import locally_aware_embedding

    batch = next(iter_batches(as_items(texture.test[:2]), det._preprocess(), 8))
    scores, _ = det._score_batch(batch.pixels)
    with torch.inference_mode():
        emb = locally_aware_embedding(det.features(batch.pixels))
        flat = emb.permute(0, 2, 3, 1).reshape(2, -1, emb.shape[1])
        dist = torch.cdist(flat, det.model.memory_bank).min(dim=2).values
    np.testing.assert_allclose(scores, dist.topk(3, dim=1).values.mean(1).numpy(), rtol=1e-4)


def test_paper_reweighting_against_a_hand_computed_case():
    from anomalens.models.patchcore import PatchCoreModel

    # memory m0 = (0, 0), m1 = (1, 0), m2 = (0, 3); each entry's 2 nearest entries, itself first
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    support = torch.tensor([[0, 1], [1, 0], [2, 0]])
    model = PatchCoreModel(bank, support, (4, 8), sigma=1.0, top_k=0)
    # two patches: p0 = (0.1, 0) next to m0 (0.1 away), p1 = (0, 5) nearest m2 (2 away)
    emb = torch.tensor([[0.1, 0.0], [0.0, 5.0]]).T.reshape(1, 2, 1, 2)
    score, amap = model.score(emb, torch.tensor([0.1, 2.0]), torch.tensor([0, 2]))
    # the most anomalous patch p1; its memory entry's support {m2, m0} lies 2 and 5 away:
    # weight = 1 - softmax([2, 5])[0] = 1 - 1 / (1 + e^3)
    assert float(score) == pytest.approx((1 - 1 / (1 + np.exp(3.0))) * 2.0, rel=1e-6)
    assert amap.shape == (1, 4, 8)
