"""Write the champion's SavedModel in TF Serving's layout, with the registry version as its version number.

    python scripts/export_tfserving.py [--output outputs/tfserving] [--name flowers]

Gives <output>/<name>/<version>/saved_model.pb and <output>/models.config, which docker/tfserving.Dockerfile
serves (make serve-best-tfserving): POST /v1/models/<name>:predict {"instances": [{"b64": "<JPEG>"}]}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from src import cli, register
from src.config import PROJECT_ROOT
from src.export import write_tfserving


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "tfserving", help="model base path")
    parser.add_argument("--name", default=cfg.registry.model_name, help="registered model name")
    args = parser.parse_args(argv)
    champion = register.require_champion(mlflow.MlflowClient(), args.name)
    path = write_tfserving(f"models:/{args.name}/{champion.version}", args.output, args.name, int(champion.version))
    print(f"{args.name} version {champion.version} (run {champion.run_id}) -> {path}")
    print(f"models.config -> {args.output / 'models.config'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
