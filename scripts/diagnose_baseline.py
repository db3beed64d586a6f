"""Why did logistic regression on the four backbones miss its anchor? Two causes, checked on validation.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/diagnose_baseline.py

The baseline (model=logistic_regression: features unit-normalised per backbone, C from its grid, fitted on train)
scored 0.8779 on test for the four offline backbones, below the issue's anchor of 0.893. This script shows, by
validation accuracy over the C grid (test is not read):
1. **lbfgs's stopping tolerance:** scikit-learn's default `tol=1e-4` against `1e-6` (model.tol), with the number
   of iterations each fit took (fixed in amendment 2 of experiments/beyond_frozen/PROTOCOL.md);
2. **the decoded size:** `backbones=[...]` used to decode each image once at the largest input (260 for
   efficientnet_lite2_260), and each 224 backbone resized that again. Up to commit a8f8ccd this script compared
   the two decodings (validation 0.9049 decoded once at 260, 0.9127 each at its own size; amendment 3). Each
   backbone now decodes at its own size, so this part checks that the four-backbone features are exactly each
   backbone's single-backbone features side by side.
Features come from the cache (paths.cache_dir), or are extracted into it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from src import cli, features
from src.model import normalization
from src.pipeline import prepare

BACKBONES = ["mobilenet_v1_100_224", "mobilenet_v2_100_224", "efficientnet_lite0_224", "efficientnet_lite2_260"]


def cached(*overrides: str) -> tuple[features.Features, list]:
    cfg = cli.config("model=logistic_regression", *overrides)
    job, inputs = prepare(cfg)
    found = features.load(inputs.network, inputs.splits, {split: ["identity"] for split in ("train", "validation")},
                          job.batch_size, Path(cfg.paths.cache_dir))
    return found, sorted(job.head.c_grid)


def fit(found: features.Features, c: float, tol: float) -> tuple[LogisticRegression, object]:
    """Logistic regression fitted on train, as model=logistic_regression fits it, and the normalisation."""
    normalize = normalization(found.widths)  # each backbone's part on its own
    x, y = found.get("train")
    return LogisticRegression(C=c, max_iter=1000, tol=tol).fit(np.asarray(normalize(x)), y), normalize


def val_curve(found: features.Features, grid: list, tol: float) -> pd.DataFrame:
    """Val accuracy and lbfgs iterations for each C, as model=logistic_regression fits them."""
    xv, yv = found.get("validation")
    rows = {}
    for c in grid:
        fitted, normalize = fit(found, c, tol)
        rows[c] = {"val accuracy": float((fitted.predict(np.asarray(normalize(xv))) == yv).mean()),
                   "iterations": int(fitted.n_iter_.max())}
    return pd.DataFrame.from_dict(rows, orient="index").astype({"iterations": int}).rename_axis("C")


def show(title: str, curves: dict[str, pd.DataFrame]) -> None:
    table = pd.concat(curves, axis=1)
    table.columns = [f"{name}: {column}" for name, column in table.columns]
    print(f"\n{title}\n{table.to_markdown(floatfmt='.4f')}")
    print("best:", ", ".join(f"{name} {curve['val accuracy'].max():.4f} (C={curve['val accuracy'].idxmax():g})"
                             for name, curve in curves.items()))


@cli.command
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    together, grid = cached(f"backbones=[{','.join(BACKBONES)}]")
    show("1. lbfgs tolerance",
         {"tol 1e-4 (scikit-learn's default)": val_curve(together, grid, 1e-4),
          "tol 1e-6": val_curve(together, grid, 1e-6)})
    alone = [cached(f"backbone={name}")[0] for name in BACKBONES]
    same = all(np.array_equal(together.arrays[key], np.concatenate([f.arrays[key] for f in alone], axis=1))
               for key in together.arrays)
    print(f"\n2. decoded size: the four-backbone features {'are' if same else 'are NOT'} each backbone's own, "
          "side by side")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
