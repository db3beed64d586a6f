from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.config import CONF_DIR, PROJECT_ROOT, UserError, check_group_choices, flatten
from src.spec import Job
from tests.conftest import compose_config

BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
OFFLINE = ["efficientnet_lite0_224", "efficientnet_lite2_260", "mobilenet_v1_100_224", "mobilenet_v2_100_224"]


def test_main_knobs_are_top_level_and_default_config_validates(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config("lr=3e-4", "batch_size=64", "epochs=5", "seed=7")
    Job.from_config(cfg)
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.seed) == (3e-4, 64, 5, 7)
    assert cfg.backbone.name == "tfhub_inception_v3_inaturalist"
    assert cfg.tracking.uri == f"sqlite:///{PROJECT_ROOT}/mlflow.db"
    assert cfg.data.splits == {"train": "train", "validation": "validation", "test": "test"}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_config_composes(name):
    cfg = compose_config(f"backbone={name}")
    Job.from_config(cfg)
    assert cfg.backbone.name == name
    assert cfg.backbone.trainable is False
    if name.startswith("tfhub_"):
        assert cfg.backbone.handle.startswith("https://tfhub.dev/")
    else:
        assert name in OFFLINE
        assert Path(cfg.backbone.handle) == Path(cfg.paths.backbones_dir) / name


def test_the_articles_four_tfhub_backbones_have_their_input_sizes():
    sizes = {name: list(compose_config(f"backbone={name}").backbone.input_size) for name in BACKBONES}
    assert sizes["tfhub_inception_v3_inaturalist"] == sizes["tfhub_inception_v3_imagenet"] == [299, 299]
    assert sizes["tfhub_mobilenet_v2_100_224"] == sizes["tfhub_resnet_50"] == [224, 224]
    assert sizes["efficientnet_lite2_260"] == [260, 260]


def test_environment_variables_move_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_BACKBONES_DIR", str(tmp_path))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    cfg = compose_config("backbone=mobilenet_v1_100_224")
    assert cfg.backbone.handle == f"{tmp_path}/mobilenet_v1_100_224"
    assert cfg.data.data_dir == str(tmp_path / "tfds")
    assert cfg.tracking.uri == "sqlite:////elsewhere/mlflow.db"


def test_tfds_data_dir_defaults_to_tfds_own_default(monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert compose_config().data.data_dir is None


@pytest.mark.parametrize("override, message", [
    ("lr=-1", "lr=-1 is invalid: expected a positive number"),
    ("lr=abc", "lr='abc' is invalid"),
    ("batch_size=0", "batch_size=0 is invalid"),
    ("batch_size=1.5", "batch_size=1.5 is invalid"),
    ("epochs=0", "epochs=0 is invalid"),
    ("model.dropout=1", "model.dropout=1 is invalid"),
    ("model.label_smoothing=-0.1", "model.label_smoothing=-0.1 is invalid"),
    ("export.top_k=0", "export.top_k=0 is invalid"),
    ("backbone.input_size=[224]", "backbone.input_size=[224] is invalid"),
    ("trainer.optimizer.name=adamw2", "trainer.optimizer='adamw2' with {} is not a Keras optimizer: no such class"),
    ("+trainer.optimizer.momentum=0.9", "trainer.optimizer='adam' with {'momentum': 0.9} is not a Keras optimizer"),
    ("trainer.cv_folds=1", "trainer.cv_folds=1 is invalid: expected null or an integer of at least 2"),
    ("trainer.refit_budget=images", "trainer.refit_budget='images' is unknown; use one of: epochs, steps"),
    ("model.head=svm", "model.head='svm' is unknown; use one of: dense, logistic_regression"),
    ("model.tta=flips", "model.tta='flips' is unknown; use one of: none, flip, crops"),
    ("model.view_policy=wild", "model.view_policy='wild' is unknown; use one of: standard, broad"),
    ("trainer.strategy=tpu", "trainer.strategy='tpu' is unknown; use one of: default, mirrored"),
])
def test_invalid_values_get_one_line_errors(override, message):
    with pytest.raises(UserError) as error:
        Job.from_config(compose_config(override))
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_unknown_group_choice_is_named_with_the_options():
    with pytest.raises(UserError, match=r"^unknown backbone 'resnet9000'; choose one of: .*mobilenet_v2_100_224"):
        check_group_choices(["backbone=resnet9000", "lr=1e-3"])
    with pytest.raises(UserError, match="unknown data 'nope'"):
        check_group_choices(["data=synthetic,nope"])
    check_group_choices(["backbone=mobilenet_v2_100_224,efficientnet_lite0_224", "data=synthetic", "lr=1e-3,3e-4"])


def test_flatten_gives_every_resolved_value_with_dotted_keys():
    cfg = compose_config("backbone=mobilenet_v2_100_224")
    flat = flatten(cfg)
    assert flat["lr"] == "0.03"
    assert flat["backbone.name"] == "mobilenet_v2_100_224"
    assert flat["model.augmentation.zoom"] == "0.1"
    assert flat["backbone.input_size"] == "[224, 224]"
    assert "${" not in "".join(flat.values())
    leaves = OmegaConf.to_container(cfg, resolve=True)
    assert len(flat) == _count_leaves(leaves)


def _count_leaves(node) -> int:
    return sum(_count_leaves(v) for v in node.values()) if isinstance(node, dict) else 1


def test_every_command_of_compose_yaml_is_a_valid_job():
    """compose.yaml is not run here (no Docker images): its commands at least compose and pass the job's checks,
    the search workers' sweeper settings included."""
    import yaml

    services = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())["services"]
    commands = {name: [a for a in s["command"] if a != "-m"] for name, s in services.items() if "command" in s}
    assert set(commands) == {"search-1", "search-2", "train-chief", "train-worker"}
    for name, overrides in commands.items():
        cfg = compose_config(*(o for o in overrides if not o.startswith("hydra.")))
        job = Job.from_config(cfg)
        assert job.strategy == ("multi_worker" if name.startswith("train") else "default"), name
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=commands["search-1"], return_hydra_config=True)
    assert cfg.hydra.sweeper.heartbeat_interval == 10 and cfg.hydra.sweeper.storage.startswith("postgresql://")
