"""Compare two runs on the same images, paired: which is better, by how much, and how sure we can be.

    python scripts/compare.py RUN_A RUN_B [--split test|validation] [--one-view] [--json]   # or: make compare RUNS="A B"

From the per-image predictions each run logged (test_predictions.csv, validation_predictions.csv): the accuracy of
each, the difference B - A with a 95 % paired-bootstrap interval over the images (2,000 seeded resamples), and
McNemar's exact two-sided p-value on the images where exactly one of the two is right. Runs evaluated on
different images (another dataset, version or split) are refused. --one-view compares each run's one-view
predictions where it averaged test-time views. Compare on validation while choosing; test is for the end.
"""

from __future__ import annotations

import argparse
import json
import sys

from src import cli, compare


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", metavar="RUN_A", help="run id of A, e.g. the baseline")
    parser.add_argument("run_b", metavar="RUN_B", help="run id of B")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--one-view", action="store_true", help="each run's one-view predictions, without TTA")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cli.config()
    paired = compare.compare_runs(args.run_a, args.run_b, args.split, args.one_view)
    if args.json:
        keys = ("n", "accuracy_a", "accuracy_b", "difference", "ci_low", "ci_high", "p_value")
        print(json.dumps({key: getattr(paired, key) for key in keys}))
        return 0
    print(f"{paired.n} {args.split} images{' (one view)' if args.one_view else ''}")
    print(f"A {args.run_a}: accuracy {paired.accuracy_a:.4f}")
    print(f"B {args.run_b}: accuracy {paired.accuracy_b:.4f}")
    print(f"B - A: {100 * paired.difference:+.2f} points, 95 % paired-bootstrap interval "
          f"[{100 * paired.ci_low:+.2f}, {100 * paired.ci_high:+.2f}]; {paired.test} p = {paired.p_value:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
