"""Does decoding every image once, at the largest backbone's size, cost the concatenated features accuracy?

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/diagnose_decode_size.py

`backbones=[...]` decodes each image at the largest input (260 for efficientnet_lite2_260), and each 224 backbone
resizes that again. A single-backbone run decodes at the backbone's own size. This script compares the two for
the four offline backbones, on validation only: logistic regression (model=logistic_regression: unit-normalised
features per backbone, C from its grid) fitted on train, the best val accuracy over the grid. Test is not read.
Features come from the cache (paths.cache_dir), or are extracted into it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from src import cli, features  # noqa: E402
from src.model import normalization  # noqa: E402
from src.pipeline import prepare  # noqa: E402

BACKBONES = ["mobilenet_v1_100_224", "mobilenet_v2_100_224", "efficientnet_lite0_224", "efficientnet_lite2_260"]


def train_and_validation(*overrides: str) -> tuple[features.Features, list]:
    cfg = cli.config("model=logistic_regression", *overrides)
    job, inputs = prepare(cfg)
    found = features.load(inputs.network, inputs.splits, {"train": ["identity"], "validation": ["identity"]},
                          job.batch_size, Path(cfg.paths.cache_dir))
    return found, sorted(job.head.c_grid)


def val_curve(found: features.Features, grid: list) -> pd.Series:
    (x, y), (xv, yv) = found.get("train"), found.get("validation")
    normalize = normalization(found.widths)  # as model=logistic_regression does, each backbone's part on its own
    x, xv = np.asarray(normalize(x)), np.asarray(normalize(xv))
    return pd.Series({c: float((LogisticRegression(C=c, max_iter=1000).fit(x, y).predict(xv) == yv).mean())
                      for c in grid}, name="val accuracy")


@cli.command
def main(argv: list[str] | None = None) -> int:
    once, grid = train_and_validation(f"backbones=[{','.join(BACKBONES)}]")
    own = [train_and_validation(f"backbone={name}")[0] for name in BACKBONES]
    each = features.Features({key: np.concatenate([f.arrays[key] for f in own], axis=1) for key in once.arrays},
                             once.labels, tuple(f.widths[0] for f in own))
    assert all((f.labels[s] == once.labels[s]).all() for f in own for s in once.labels), "splits differ in order"
    table = pd.DataFrame({"decoded once at 260": val_curve(once, grid),
                          "each at its own size": val_curve(each, grid)}).rename_axis("C")
    print(table.to_markdown(floatfmt=".4f"))
    print("best:", ", ".join(f"{column} {table[column].max():.4f} (C={table[column].idxmax():g})"
                             for column in table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
