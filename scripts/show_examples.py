"""Draw a grid of the dataset's images with their class names, as the article does.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python scripts/show_examples.py [--split train] [--n 20]
    python scripts/show_examples.py data=image_folder data.root=/path/to/photos --out photos.png

The images are a seeded random sample of the split, shown at their own size and aspect. Config overrides
(data=..., data.*) pick the dataset as they do for train.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tensorflow as tf

from src import cli
from src.config import PROJECT_ROOT, UserError, load_config
from src.data import SPLITS, load_splits
from src.plots import dataset_examples


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--n", type=int, default=20, help="how many images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default experiments/dataset_examples/<dataset>_<split>.jpg")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=image_folder data.root=...")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n {args.n} is invalid: expected a positive number of images")
    splits = load_splits(load_config(*args.overrides).data)
    examples = list(getattr(splits, args.split).shuffle(10_000, seed=args.seed).take(args.n))
    images = [tf.io.decode_image(image, channels=3, expand_animations=False).numpy() for image, _ in examples]
    labels = [int(label) for _, label in examples]
    title = f"{splits.name} {splits.version}: {args.split} split, {len(images)} random images ({len(splits.class_names)} classes)"
    out = args.out or PROJECT_ROOT / "experiments" / "dataset_examples" / f"{splits.name}_{args.split}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = dataset_examples(images, labels, splits.class_names, title)
    figure.savefig(out, dpi=80, **({"pil_kwargs": {"quality": 85}} if out.suffix in (".jpg", ".jpeg") else {}))
    print(f"{len(images)} {args.split} images of {splits.name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
