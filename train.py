"""Train, evaluate, export and track one flower classifier; with -m, a sweep or an Optuna search of them.

    python train.py backbone=mobilenet_v2_100_224 lr=1e-3 batch_size=32
    python train.py -m backbone=mobilenet_v2_100_224,efficientnet_lite0_224 lr=1e-3,3e-4
    python train.py -m hparams_search=mobilenet_v2
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from src.config import UserError, check_group_choices

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here, after Hydra parsed the command line: TensorFlow is slow to import.
    import optuna

    from src.pipeline import run_job
    from src.search import PruningCallback
    from src.selection import SCORE
    from src.track import SWEEP_RUN_ENV

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            return run_job(cfg, output_dir)[SCORE]
        except UserError as error:
            sys.exit(f"error: {error}")

    # A job of a sweep: its MLflow run is a child of the sweep's run, and a failure does not stop the sweep.
    try:
        callbacks = [] if cfg.get("optuna_trial") is None else [PruningCallback(hydra_cfg.sweeper, cfg.optuna_trial)]
        return run_job(cfg, output_dir, parent_run_id=os.environ.get(SWEEP_RUN_ENV), callbacks=callbacks)[SCORE]
    except optuna.TrialPruned:
        raise  # the Optuna sweeper tells the study
    except Exception as error:
        log.exception("job %s failed: %s", hydra_cfg.job.num, error)
        return None


if __name__ == "__main__":
    try:
        check_group_choices([arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")])
    except UserError as error:
        sys.exit(f"error: {error}")
    main()
