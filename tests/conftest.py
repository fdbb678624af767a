"""Shared fixtures: tiny synthetic MVTec-layout data, generated once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail fast, never hang

import anomalens  # noqa: E402
from anomalens.data import load_mvtec, make_synthetic_dataset  # noqa: E402

# per-detector options that keep every test fast; methods not listed use FAST_DEFAULT
FAST_DEFAULT = {"image_size": 64, "batch_size": 8}
FAST_OPTIONS = {
    "patchcore": {"coreset_min_size": 200},
    "padim": {"n_features": 40},
    "multi": {"method_options": "coreset_min_size=200"},
    # reconstruction models: a small, shallow net learns the synthetic texture in ~40 short epochs; the GANs
    # score by their residual map (the papers' latent scores need far more training than a unit test)
    "autoencoder": {
        "depth": 2,
        "width": 16,
        "latent": 128,
        "loss": "l2",
        "channels": 1,
        "epochs": 40,
        "lr": 2e-3,
    },
    "fanogan": {
        "width": 8,
        "latent": 64,
        "gan_epochs": 20,
        "epochs": 40,
        "lr": 1e-3,
        "channels": 1,
        "n_critic": 2,
        "score": "residual",
    },
    "ganomaly": {"width": 8, "latent": 64, "epochs": 30, "lr": 1e-3, "channels": 1, "score": "residual"},
    "stfpm": {"epochs": 10},
    "reverse_distillation": {"epochs": 10},
    "efficientad": {
        "epochs": 3,
        "out_channels": 64,
        "distill_steps": 10,
        "distill_batch_size": 4,
        "distill_crop": 64,
    },
    "utrad": {"windows": (4, 2), "dim": 32, "heads": 2, "depth": 1, "epochs": 3, "lr": 1e-3},
    "vtadl": {
        "patch_size": 8,
        "dim": 32,
        "depth": 1,
        "heads": 2,
        "mdn_hidden": 8,
        "batch_size": 4,
        "epochs": 20,
        "lr": 2e-3,
    },
    # the discriminator separates strongly noised features in ~100 steps on the tiny set
    "simplenet": {"epochs": 60, "noise_std": 0.2, "hidden": 256, "lr": 1e-3, "adaptor_lr": 1e-3},
    "draem": {
        "image_size": 32,
        "recon_width": 8,
        "seg_width": 8,
        "depth": 2,
        "score_window": 3,
        "epochs": 100,
        "lr": 2e-3,
        "validation_fraction": 0,
    },
    # pyramids of 2 levels onto an 8x8 grid, perceptual loss on the backbone's first two stages
    "pyramid_ae": {
        "levels": 2,
        "depth": 3,
        "width": 16,
        "code": 16,
        "latent": 16,
        "layers": (1, 2),
        "epochs": 20,
    },
    "piade": {
        "levels": 2,
        "depth": 3,
        "width": 16,
        "code": 16,
        "capsules": 4,
        "capsule_dim": 4,
        "layers": (1, 2),
        "epochs": 20,
        "lr": 2e-3,
    },
    "vqganodip": {
        "channels": 1,
        "width": 8,
        "levels": 2,
        "code_dim": 16,
        "n_codes": 32,
        "disc_width": 8,
        "disc_layers": 2,
        "ae_epochs": 15,
        "epochs": 15,
        "lr": 2e-3,
    },
    # a narrow stem and 8 capsule types: the margin loss leaves its plateau within the 80 steps
    "capsnet": {"stem": "conv", "width": 8, "primary_types": 8, "epochs": 40, "lr": 2e-3},
    # the supervised U-Net on the labelled fixture's 8 masked defects: three encoder stages, the
    # third fine-tuned, 60 steps
    "unet": {"layers": (0, 1, 2), "frozen_stages": 2, "lr": 1e-2, "epochs": 15, "smooth": 3},
    # the labelled set's 8 defects as the abnormal domain, 120 steps at 64 px (at 32 px the small defects
    # are missed); instance norm and the SSE score (no backbone) detect the texture's defects in 120
    # steps (0.64 to 0.86 in 60), batch norm and score=feature are covered in test_cyclegan_ad.py
    "cyclegan_ad": {
        "channels": 1,
        "width": 8,
        "blocks": 2,
        "d_width": 16,
        "d_layers": 2,
        "epochs": 60,
        "lr": 2e-3,
        "norm": "instance",
        "score": "sse",
    },
}
# classical (PyOD) detectors: pooled stage-3 backbone features; neighbour counts below the 14 fit images
_CLASSICAL_PYOD = {
    "lof": "n_neighbors=5",
    "feature_bagging": "n_neighbors=5",
    "iforest": "n_estimators=500",
    "lscp": "lof_neighbors=3,5,7;local_region_size=5",
}
FAST_OPTIONS.update(
    {
        f"classical:{k}": {"features": "deep:3", "pyod": _CLASSICAL_PYOD.get(k, "")}
        for k in (
            "abod",
            "cblof",
            "feature_bagging",
            "hbos",
            "iforest",
            "knn",
            "avg_knn",
            "lof",
            "ocsvm",
            "pca",
            "lscp",
            "inne",
            "gmm",
            "kde",
            "lmdd",
        )
    }
)


TRAINED = (
    "autoencoder",
    "fanogan",
    "ganomaly",
    "stfpm",
    "reverse_distillation",
    "efficientad",
    "utrad",
    "vtadl",
    "simplenet",
    "draem",
    "pyramid_ae",
    "piade",
    "vqganodip",
    "capsnet",
    "unet",
    "cyclegan_ad",
)
for _name in TRAINED:  # the tiny sets train for the epochs given, not the defaults' minimum step count
    FAST_OPTIONS[_name]["min_steps"] = 0


# the smallest real model: an autoencoder of a few hundred weights, one epoch on a few 32 px images
TINY_AUTOENCODER = {
    "image_size": 32,
    "depth": 2,
    "width": 4,
    "latent": 8,
    "channels": 1,
    "epochs": 1,
    "min_steps": 0,
    "loss": "l2",
}


def fast_options(name: str) -> dict:
    return {**FAST_DEFAULT, **FAST_OPTIONS.get(name, {})}


def fit_fast(name: str, dataset, labelled=None, **options):
    """A detector of `name` with fast_options (and `options`) fitted on `dataset`'s training goods;
    methods that learn from labelled defects also get `labelled`'s test defects and masks (another
    synthetic set: never the images the test scores)."""
    det = anomalens.create(name, **{**fast_options(name), **options})
    kwargs = {}
    if det.uses_defects != "none" and labelled is not None:
        defects = labelled.test_defective
        kwargs = {"defects": [s.path for s in defects], "defect_masks": [s.mask_path for s in defects]}
    return det.fit(dataset.train, **kwargs)


class ContractFits(dict):
    """One `fit_fast` detector per method on the texture, fitted when a test first asks for it and
    shared by the contract and export tests (a fit per method, not one per test file). Tests must
    not change these detectors."""

    def __init__(self, dataset, labelled) -> None:
        super().__init__()
        self.dataset, self.labelled = dataset, labelled

    def __missing__(self, name: str):
        self[name] = fit_fast(name, self.dataset, self.labelled)
        return self[name]


def require_openvino() -> None:
    """Skip a test of the openvino runtime when OpenVINO is not installed, except in CI, whose
    `make test` installs it (the dev extra): there it fails."""
    from anomalens.export import openvino_available

    if not openvino_available():
        message = "OpenVINO is not installed: pip install 'anomalens[openvino]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("texture") / "tex",
        kind="texture",
        n_train=16,
        n_test_good=6,
        n_test_defect=6,
        size=64,
        seed=1,
    )


@pytest.fixture(scope="session")
def texture(texture_root):
    return load_mvtec(texture_root)


@pytest.fixture(scope="session")
def contract_fits(texture, labelled):
    return ContractFits(texture, labelled)


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    """Labelled defects (with masks) of the texture's kind for the methods that learn from them:
    another seed, so no image the tests score."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("labelled") / "tex",
        kind="texture",
        n_train=1,
        n_test_good=1,
        n_test_defect=8,
        size=64,
        seed=11,
    )
    return load_mvtec(root)
