"""f-AnoGAN's score terms per set: which one carries the signal (docs/reconstruction.md, "f-AnoGAN's
image score").

Usage:
    python benchmarks/bench_fanogan_score.py NAME CATEGORY_FOLDER MAX_MINUTES SEED [IMAGE_SIZE [CHANNELS]]

Trains f-AnoGAN once (CPU defaults but MAX_MINUTES of training, IMAGE_SIZE px, default 128) and reads
every candidate image score off the same model: the pixel term, the feature term, their sum A(x),
the paper's raw sum, the map's maximum and mean, and sums of terms standardized on the validation
goods. Prints one JSON line with each candidate's AUROC on held-out goods (calibration + validation,
never trained on) against the same goods, squashed to the canvas, with a synthetic scratch, blob and
crack drawn on each (the numbers a default is chosen on), and on the test split (shown, not used to
choose).
"""

import json
import sys
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalens.data import load_dataset
from anomalens.data.inputs import as_items
from anomalens.data.synthetic import DEFECT_TYPES, add_defect
from anomalens.models.base import split_items
from anomalens.registry import create

torch.set_num_threads(1)
name, path, minutes, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
size = int(sys.argv[5]) if len(sys.argv) > 5 else 128
ds = load_dataset(path)
channels = int(sys.argv[6]) if len(sys.argv) > 6 else 3
det = create("fanogan", seed=seed, channels=channels, max_minutes=minutes, image_size=size)
t = time.time()
det.fit(ds.train)
fit_s = time.time() - t
items = as_items(ds.train)
fit_items, cal_items = split_items(items, det.options["calibration_fraction"], seed)
val_items = det._validation_items
held = list(cal_items) + list(val_items)  # goods never trained on
m = det._scorer()
pre = det.preprocess()


def terms(arrs):
    out = {k: [] for k in ("a_r", "a_d", "map_max", "map_mean")}
    with torch.no_grad():
        for i in range(0, len(arrs), 16):
            x = torch.cat([pre.canvases(a, str(j))[0] for j, a in enumerate(arrs[i : i + 16])])
            z, _ = m.encoder(x)
            r = m.generator(z)
            _, fx = m.critic(x)
            _, fr = m.critic(r)
            out["a_r"] += ((x - r) ** 2).flatten(1).mean(1).tolist()
            out["a_d"] += (((fx - fr) ** 2).mean(1) / m.feature_scale.value).tolist()
            pk, mp = m.residual(x, r)
            out["map_max"] += pk.tolist()
            out["map_mean"] += mp.mean((1, 2)).tolist()
    return {k: np.array(v) for k, v in out.items()}


def load(p):
    # squashed to the model's canvas first, as the model sees it: small tiles fit a defect there too
    im = Image.open(p)
    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255


rng = np.random.default_rng(100 + seed)
held_imgs = [load(it.path) for it in held]
synth = []
for im in held_imgs:
    for d in DEFECT_TYPES:
        synth.append(add_defect(im, d, rng)[0])
val_imgs = [load(it.path) for it in val_items] or [load(it.path) for it in fit_items[:16]]
test_imgs = [load(s.path) for s in ds.test]
labels = np.array([s.label for s in ds.test])
T_val, T_held, T_syn, T_test = terms(val_imgs), terms(held_imgs), terms(synth), terms(test_imgs)
kappa = m.kappa
scale = float(m.feature_scale.value)


def cands(T):
    def z(k):  # standardized by the validation goods' mean and spread
        return (T[k] - T_val[k].mean()) / (T_val[k].std() + 1e-12)

    return {
        "izi_f (current)": T["a_r"] + kappa * T["a_d"],
        "paper raw sum": T["a_r"] + kappa * T["a_d"] * scale,
        "a_r pixel": T["a_r"],
        "a_d feature": T["a_d"],
        "map max": T["map_max"],
        "map mean": T["map_mean"],
        "z(a_r)+z(a_d)": z("a_r") + z("a_d"),
        "z(a_r)+z(a_d)+z(max)": z("a_r") + z("a_d") + z("map_max"),
        "z(max)+z(a_d)": z("map_max") + z("a_d"),
    }


C_held, C_syn, C_test = cands(T_held), cands(T_syn), cands(T_test)
res = {
    "set": name,
    "seed": seed,
    "fit_s": round(fit_s, 1),
    "n_held": len(held),
    "n_val": len(val_items),
    "n_synth": len(synth),
    "n_test": len(labels),
    "feature_scale": scale,
    "training": det.fit_info.get("training"),
    "ratio_kappa_ad_over_ar_goods": float(np.median(kappa * T_held["a_d"] / T_held["a_r"])),
    "synthetic": {},
    "test": {},
}
ys = np.r_[np.zeros(len(held)), np.ones(len(synth))]
for k in C_held:
    res["synthetic"][k] = round(roc_auc_score(ys, np.r_[C_held[k], C_syn[k]]), 3)
    res["test"][k] = round(roc_auc_score(labels, C_test[k]), 3)
print(json.dumps(res), flush=True)
