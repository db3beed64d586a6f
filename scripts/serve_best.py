"""Serve the champion model with MLflow's scoring server on 127.0.0.1:8080 (make serve-best PORT=...).

    python scripts/serve_best.py [--model-uri URI] [serve.port=8080 serve.runtime=tflite serve.workers=2 ...]

POST /invocations {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ...]}}
  -> {"predictions": [{"class_name", "label", "score", "top_k": [{"class_name", "label", "score"}, ...]}, ...]}
GET /ping, /health, /version. Limits (images per request, pixels per image, body size) are in conf/serve/.
serve.runtime=openvino|tflite|tflite_int8_dynamic|tflite_float16 serves the model's OpenVINO or TFLite export
(make export-tflite; made first when missing) with the same contract, and first prints how often that export
agreed with the SavedModel on test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from src import cli, runtimes, serve
from src.config import validate_serve


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="serve this model instead of models:/<registry.model_name>@champion")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.port=9000 serve.max_images=8")
    args = parser.parse_args(argv)
    cfg = cli.config(*args.overrides)
    validate_serve(cfg)
    # Bound first: a taken port fails now, not once the model is loaded; closed on any error after.
    with serve.listening_socket(cfg.serve.host, cfg.serve.port) as sock:
        if cfg.serve.workers == 1:  # else each worker sets its own, and this process may have runtime models to make
            serve.use_threads(cfg.serve)
        model_uri, which = (args.model_uri, "") if args.model_uri else serve.champion_uri(cfg.registry.model_name)
        folder = None
        if cfg.serve.runtime != "savedmodel":
            _, folder = runtimes.runtime_model(mlflow.MlflowClient(), cfg.serve.runtime, args.model_uri,
                                               cfg.registry.model_name, Path(cfg.paths.runtimes_dir))
            served = folder / runtimes.SERVED[cfg.serve.runtime]
            which = ", ".join(filter(None, [which, f"{cfg.serve.runtime}: {served}"]))
            print(runtimes.agreement(cfg.serve.runtime, folder), flush=True)
        workers = f", {cfg.serve.workers} workers" if cfg.serve.workers > 1 else ""
        print(f"serving {model_uri} {f'({which}) ' if which else ''}on "
              f"http://{cfg.serve.host}:{cfg.serve.port}/invocations{workers}", flush=True)
        serve.serve(model_uri, cfg.serve, folder, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
