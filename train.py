"""Train, evaluate, export and track one flower classifier (or a sweep of them with -m).

    python train.py backbone=mobilenet_v2_100_224 lr=1e-3 batch_size=32
    python train.py -m backbone=mobilenet_v2_100_224,efficientnet_lite0_224 lr=1e-3,3e-4
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.config import UserError, check_group_choices


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from src.pipeline import run_job  # after Hydra parsed the command line: TensorFlow is slow to import

    try:
        metrics = run_job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as error:
        sys.exit(f"error: {error}")
    return metrics["val/accuracy_best"]


if __name__ == "__main__":
    try:
        check_group_choices([arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")])
    except UserError as error:
        sys.exit(f"error: {error}")
    main()
