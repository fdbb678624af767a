"""`explain`: why an image was flagged."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from anomalens.cli.common import fail, out, user_errors

MAX_NORMALS = 32  # LIME's replacement content: enough variety, bounded reading cost per image


def explain(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    images: list[Path] = typer.Argument(
        ..., metavar="IMAGES...", help="image files and/or folders to explain"
    ),
    output: Path = typer.Option(..., "--output", "-o", help="folder for the overlay PNGs and explain.json"),
    method: str = typer.Option(
        "map",
        "--method",
        help="map (the detector's own map), lime-score (LIME on the "
        "anomaly score, any detector), gradcam or lime (a "
        "classifier trained on the detector's pseudo-labels)",
    ),
    normal: Path | None = typer.Option(
        None,
        "--normal",
        help="folder of good images: the content LIME puts in place of a superpixel (default: a blur)",
    ),
    baseline: str = typer.Option(
        "auto", help="LIME replacement: auto, normal (nearest good image), mean, blur"
    ),
    segments: int = typer.Option(64, "--segments", help="LIME: number of SLIC superpixels"),
    samples: int = typer.Option(128, "--samples", help="LIME: perturbed images scored per explained image"),
    classifier_file: Path | None = typer.Option(
        None,
        "--classifier",
        help="gradcam/lime: classifier file to "
        "use; without it one is trained and saved to "
        "OUTPUT/classifier.safetensors",
    ),
    train_on: Path | None = typer.Option(
        None,
        "--train-on",
        help="gradcam/lime: images the detector pseudo-labels to train the classifier (default: IMAGES)",
    ),
    anomalous_fraction: float = typer.Option(
        0.2, help="pseudo-labels: top share of scores taken as anomalous"
    ),
    normal_fraction: float = typer.Option(0.5, help="pseudo-labels: bottom share of scores taken as normal"),
    classifier_loss: str = typer.Option(
        "cross_entropy",
        "--classifier-loss",
        help="gradcam/lime: the classifier's loss: cross_entropy, wmw (ranking) or wmw_full_recall "
        "(the hardest defect ranked above the goods: miss none at the fewest false alarms)",
    ),
    min_region: int = typer.Option(16, "--min-region-area", help="smallest region reported, in pixels"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Explain why and where images were flagged: image | heat-map PNGs and a JSON summary.

    For map and LIME explanations, regions are where the map reaches the calibrated pixel threshold
    (map) or half the image's strongest evidence (the others). gradcam/lime also report the
    classifier's agreement with the detector on held-out pseudo-labelled images.

    Example: anomalens explain tile.model flagged/ --method lime-score --normal train/good -o why/
    """
    from anomalens.data import read_image
    from anomalens.data.inputs import as_items
    from anomalens.explain import (
        METHODS,
        AnomalyClassifier,
        explain_images,
        explanation_figure,
        train_classifier,
    )
    from anomalens.models.base import Detector
    from anomalens.workflows.predict import overlay_name

    if method not in METHODS:
        fail(f"--method {method!r}: use one of {', '.join(METHODS)}")
    try:
        detector = Detector.load(model_file)
        detector.options["device"] = device
        items = as_items(images)
        if not items:
            fail("no images found in " + ", ".join(map(str, images)))
        normals = None
        if normal is not None:
            good = as_items(normal)
            if not good:
                fail(f"--normal '{normal}': no images found")
            normals = [g.path for g in good[:: max(1, len(good) // MAX_NORMALS)][:MAX_NORMALS]]
        classifier = None
        if method in ("gradcam", "lime"):
            if classifier_file is not None:
                classifier = AnomalyClassifier.load(classifier_file)
            else:
                pool = as_items(train_on) if train_on is not None else items
                scores = detector.predict(pool)
                ranking = scores.normalized_scores if scores.calibration is not None else scores.scores
                classifier = train_classifier(
                    ranking,
                    [it.path for it in pool],
                    anomalous_fraction=anomalous_fraction,
                    normal_fraction=normal_fraction,
                    loss=classifier_loss,
                )
                output.mkdir(parents=True, exist_ok=True)
                classifier.save(output / "classifier.safetensors")
        explanations = explain_images(
            detector,
            items,
            method,
            classifier=classifier,
            normal_images=normals,
            baseline=baseline,
            n_segments=segments,
            num_samples=samples,
        )
    except user_errors() as e:
        fail(str(e))
    output.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for e in explanations:
        name = overlay_name(Path(e.key), used)
        explanation_figure(e, read_image(e.key), min_region).save(output / name)
        rows.append(
            {
                "path": e.key,
                "figure": name,
                "score": e.score,
                "normalized_score": e.normalized_score,
                "flagged": e.flagged,
                "peak_xy": e.peak(),
                "regions": [r.to_dict() for r in e.regions(min_region)],
                "seconds": e.seconds,
            }
        )
    summary = {"model": str(model_file), "detector": detector.name, "method": method, "images": rows}
    if classifier is not None:
        summary["classifier"] = {**classifier.config, **classifier.info}
    (output / "explain.json").write_text(json.dumps(summary, indent=2))
    agreement = (
        ""
        if classifier is None
        else f"; classifier agrees with the detector on "
        f"{classifier.info.get('agreement', float('nan')):.0%} of held-out images"
    )
    out.print(
        f"explained {len(rows)} images with {method}{agreement}; wrote {output / 'explain.json'}",
        highlight=False,
    )
