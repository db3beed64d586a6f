"""Serve the champion model with MLflow's scoring server on 127.0.0.1:8080 (make serve-best PORT=...).

    python scripts/serve_best.py [--model-uri URI] [serve.port=8080 serve.max_images=32 ...]

POST /invocations {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ...]}}
  -> {"predictions": [{"class_name", "label", "score", "top_k": [{"class_name", "label", "score"}, ...]}, ...]}
GET /ping, /health, /version. Limits (images per request, pixels per image, body size) are in conf/serve/.
"""

from __future__ import annotations

import argparse
import sys

from src import cli, serve
from src.config import validate_serve


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="serve this model instead of models:/<registry.model_name>@champion")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.port=9000 serve.max_images=8")
    args = parser.parse_args(argv)
    cfg = cli.config(*args.overrides)
    validate_serve(cfg)
    model_uri, which = (args.model_uri, "") if args.model_uri else serve.champion_uri(cfg.registry.model_name)
    print(f"serving {model_uri} {f'({which}) ' if which else ''}on http://{cfg.serve.host}:{cfg.serve.port}/invocations",
          flush=True)
    serve.serve(model_uri, cfg.serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
