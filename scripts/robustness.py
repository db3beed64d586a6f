"""A model under the shifts that photos from elsewhere bring: the test split (or a labelled folder), as it is and
under 8 shifts at 3 severities each, through the model as served.

    python scripts/robustness.py --model-uri runs:/<run id>/model        # or: make robustness MODEL=<uri>
    python scripts/robustness.py --model-uri models:/flowers@champion --folder photos/ --json

The shifts (src/shifts.py) are zoom-out, off-centre crops, rotation, colour temperature, brightness and contrast,
blur, JPEG quality and low resolution; each is seeded and deterministic, and each shifted photo reaches the model
as a PNG of it, as a client would send it. The photos are a stratified sample of the model's run's test split
(conf/robustness: --per-class images of each class; the same sample as a run's shifted/test/* metrics), or every
photo of --folder <folder>/<class name>/*. Prints the table and logs an MLflow evaluation run (tag
evaluation.kind=robustness) with it, a figure and the metrics: clean and shifted accuracy (the mean over the 24
conditions), each with a 95 % bootstrap interval. --json prints the metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from src import cli, external
from src.config import UserError


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = cli.model_parser(__doc__.splitlines()[0], cfg)
    parser.add_argument("--folder", type=Path, help="labelled photos, <folder>/<class name>/*, instead of test")
    parser.add_argument("--per-class", type=int, default=cfg.robustness.per_class, help="test images per class")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        raise UserError(f"--per-class {args.per_class} is invalid: expected a positive number of images")
    images, labels, sample = external.sample_images(args.model_uri, args.per_class, args.folder)
    table, metrics = external.robustness(external.load_model(args.model_uri), images, labels)
    run_id = external.log_robustness(args.model_uri, args.experiment, table, metrics, sample)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(table.to_markdown(index=False, floatfmt=".4f"))
    print(f"{metrics['n']:.0f} photos ({sample}): clean {metrics['clean/accuracy']:.4f} "
          f"[{metrics['clean/accuracy_ci_low']:.4f}, {metrics['clean/accuracy_ci_high']:.4f}], shifted "
          f"{metrics['shifted/accuracy']:.4f} [{metrics['shifted/accuracy_ci_low']:.4f}, "
          f"{metrics['shifted/accuracy_ci_high']:.4f}]; evaluation run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
