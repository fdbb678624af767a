"""The labelled-defects contract of `Detector.fit` (`fit --labels`, `--train-defects`): who takes
defects, masks on the model's canvases, and no image a model learnt from ever evaluated."""

import numpy as np
import pytest

import anomalens
from anomalens.data import load_mvtec
from anomalens.data.geometry import Geometry, place_mask
from anomalens.data.labels import split_train_defects
from anomalens.models.padim import Padim
from anomalens.workflows.evaluate import evaluate
from conftest import fast_options


class LabelledPaDiM(Padim):
    """PaDiM that records the labelled batches it is given (a stand-in for a supervised method)."""

    name = "padim"
    uses_defects = "optional"
    needs_defect_masks = True

    def _fit_batches(self, batches, n_images):
        self.seen = self.labelled_defects()
        super()._fit_batches(batches, n_images)


def test_goods_only_methods_refuse_defects_and_say_where_to_go(texture, labelled):
    det = anomalens.create("padim", **fast_options("padim"))
    with pytest.raises(ValueError, match="anomalens refine"):
        det.fit(texture.train, defects=[s.path for s in labelled.test_defective])


def test_masks_are_required_when_the_method_needs_them(texture, labelled):
    det = LabelledPaDiM(**fast_options("padim"))
    defects = labelled.test_defective
    with pytest.raises(ValueError, match="needs a pixel mask"):
        det.fit(texture.train, defects=[s.path for s in defects], defect_masks=[None] * len(defects))
    with pytest.raises(ValueError, match="8 labelled defects but 1 defect masks"):
        det.fit(texture.train, defects=[s.path for s in defects], defect_masks=[None])


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_labelled_defects_carry_each_mask_onto_its_canvas(texture, labelled, resize):
    defects = labelled.test_defective
    # batches of 3: the 8 defects are read in three batches and joined
    det = LabelledPaDiM(**{**fast_options("padim"), "batch_size": 3}, resize=resize)
    det.fit(texture.train, defects=[s.path for s in defects], defect_masks=[s.mask_path for s in defects])
    pixels, masks = (t.numpy() for t in det.seen)
    assert pixels.shape[0] == masks.shape[0] == len(defects)
    assert pixels.shape[-2:] == masks.shape[-2:] == (64, 64)
    assert set(np.unique(masks)) <= {0.0, 1.0} and (masks.reshape(len(masks), -1).sum(1) > 0).all()
    # the synthetic defects are darker or brighter blobs: inside the mask the pixels differ from outside
    for img, m in zip(pixels, masks):
        inside, outside = img[:, m > 0].mean(), img[:, m == 0].mean()
        assert abs(inside - outside) > 0.05
    assert det.fit_info["defects"]["n"] == len(defects)
    assert det._defects == []  # not kept after the fit


def test_place_mask_follows_letterbox_padding_and_tiles():
    mask = np.zeros((50, 200), bool)
    mask[10:20, 180:190] = True
    placed = place_mask(mask, Geometry((64, 64), "letterbox").place(50, 200))
    assert placed.shape == (1, 64, 64)
    assert placed[0, 16:, :].sum() == 0  # rows below the 16-row image are padding
    ys, xs = np.nonzero(placed[0])
    assert ys.min() >= 2 and ys.max() <= 6 and xs.min() >= 56 and xs.max() <= 62
    tiles = place_mask(mask, Geometry((64, 64), "native", 1.0, 64, 0.25).place(50, 200))
    assert tiles.shape[0] > 1 and tiles.sum() >= mask.sum()  # overlaps repeat the spot


def test_evaluate_never_counts_the_defects_a_model_learnt_from(texture_root, tmp_path):
    dataset = load_mvtec(texture_root)
    rest, moved = split_train_defects(dataset, 2, seed=3)
    defects = [s for s in moved if s.label == 1]
    det = LabelledPaDiM(**fast_options("padim"))
    det.fit(dataset.train, defects=[s.path for s in defects], defect_masks=[s.mask_path for s in defects])
    det = anomalens.load(det.save(tmp_path / "m.model"))
    full = evaluate(det, dataset, per_type=False)
    assert full.metrics["n_left_out_trained_on"] == len(defects)
    assert not {str(s.path) for s in defects} & {str(s.path) for s in full.samples}
    split = evaluate(det, rest, per_type=False)
    assert split.metrics["n_left_out_trained_on"] == 0
    assert len(split.samples) == len(dataset.test) - len(moved)


def test_cli_fit_takes_labels_only_for_methods_that_use_them(texture_root, tmp_path):
    from typer.testing import CliRunner

    from anomalens.cli import app

    result = CliRunner().invoke(
        app,
        ["fit", str(texture_root), "-m", "padim", "--train-defects", "1", "-o", str(tmp_path / "m.model")],
    )
    assert result.exit_code == 2 and "anomalens refine" in result.output
    result = CliRunner().invoke(
        app,
        [
            "fit",
            str(texture_root),
            "--labels",
            "x.csv",
            "--train-defects",
            "1",
            "-o",
            str(tmp_path / "m.model"),
        ],
    )
    assert result.exit_code == 2 and "not both" in result.output


def test_labelled_folder_reads_masks_from_ground_truth(tmp_path):
    from anomalens.data.labels import load_labelled
    from anomalens.data.synthetic import _save

    rng = np.random.default_rng(0)
    for rel in ("good/a.png", "scratch/b.png", "scratch/c.png", "ground_truth/scratch/b_mask.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _save((rng.random((16, 16)) * 255).astype(np.uint8), tmp_path / rel)
    samples = {s.path.name: s for s in load_labelled(tmp_path)}
    assert set(samples) == {"a.png", "b.png", "c.png"}  # ground_truth/ is no defect type
    assert samples["b.png"].mask_path == tmp_path / "ground_truth/scratch/b_mask.png"
    assert samples["c.png"].mask_path is None and samples["a.png"].label == 0
