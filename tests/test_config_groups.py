"""Every option of every config group composes, through Hydra's compose API as `python train.py` would, and
resolves into a job spec (lightning-hydra-template style)."""

import pytest
from hydra import compose, initialize_config_dir

from src.config import CONF_DIR, flatten
from src.spec import Job
from tests.conftest import compose_config

NEEDS = {"data/image_folder": ["data.root=/tmp/photos"]}  # a mandatory value the user gives
OPTIONS = sorted((group.name, path.relative_to(group).with_suffix("").as_posix())
                 for group in CONF_DIR.iterdir() if group.is_dir() for path in group.rglob("*.yaml"))


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == {
        "backbone", "data", "experiment", "export", "hparams_search", "model", "paths", "registry", "robustness", "serve",
        "technique", "tracking", "trainer"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves_into_a_job(group, option):
    cfg = compose_config(f"{group}={option}", *NEEDS.get(f"{group}/{option}", []))
    job = Job.from_config(cfg)
    assert job.backbones and job.run_name and job.lr > 0
    # A technique or experiment changes the job; a search may change only its sweeper (checked below), e.g.
    # hparams_search=multi_backbone searches the default head's settings.
    if group in ("technique", "experiment") and option != "frozen":
        assert flatten(cfg) != flatten(compose_config())  # it changes something


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g in ("hparams_search", "experiment")])
def test_searches_and_experiments_declare_what_they_sweep(option):
    group = "hparams_search" if (CONF_DIR / "hparams_search" / f"{option}.yaml").is_file() else "experiment"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"{group}={option}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, option
    if group == "hparams_search":
        assert cfg.hydra.sweeper.storage and cfg.hydra.sweeper.n_trials >= 1
