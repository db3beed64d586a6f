"""Score a model on labelled photos from elsewhere: a folder <DIR>/<class name>/*, through the model as served.

    python scripts/evaluate.py --model-uri runs:/<run id>/model --folder photos/ [--json]
    make evaluate MODEL=models:/flowers@champion FOLDER=photos/

Folder names are some of the model's class names (case-insensitive; `_` or `-` for a space). Logs an MLflow
evaluation run (tag evaluation=true, the model URI as a param) with the accuracy and its 95 % bootstrap interval,
mean per-class accuracy, the confusion among the folder's classes (and what else they were taken for) as a figure
and CSV, each photo's answer, and a grid of the most confident mistakes. --json prints
{"n", "accuracy", "ci_low", "ci_high", "mean_class_accuracy"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from src import cli, external


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = cli.model_parser(__doc__.splitlines()[0], cfg)
    parser.add_argument("--folder", type=Path, required=True, help="<folder>/<class name>/*.jpg")
    args = parser.parse_args(argv)
    model = external.load_model(args.model_uri)
    files, images, labels = external.read_folder(args.folder, model.unwrap_python_model().class_names)
    scored = external.score(model, images, labels, f"evaluating {args.folder.name}", files)
    run_id = external.log_evaluation(args.model_uri, args.experiment, f"evaluate-{args.folder.resolve().name}",
                                     scored, tags={"evaluation.folder": str(args.folder.resolve())})
    m = scored.metrics
    if args.json:
        print(json.dumps({"n": int(m["n"]), "accuracy": m["accuracy"], "ci_low": m["accuracy_ci_low"],
                          "ci_high": m["accuracy_ci_high"], "mean_class_accuracy": m["mean_class_accuracy"]}))
    else:
        print(f"{m['n']:.0f} photos of {len(set(labels))} classes: accuracy {m['accuracy']:.4f} "
              f"[{m['accuracy_ci_low']:.4f}, {m['accuracy_ci_high']:.4f}], mean per-class accuracy "
              f"{m['mean_class_accuracy']:.4f}, top-5 {m['top5_accuracy']:.4f}; evaluation run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
