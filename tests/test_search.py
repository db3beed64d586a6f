"""The Optuna helpers on in-memory and SQLite studies: samplers, storage, heartbeats, abandoned trials."""

import os
import subprocess
import sys

import optuna
import pytest
from omegaconf import OmegaConf

from src import search
from src.config import UserError

SAMPLER = OmegaConf.create({"name": "TPESampler", "seed": 42})
SPACE = OmegaConf.create({"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                          "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
                          "depth": {"type": "int", "low": 1, "high": 9}})


def draw(study, n_trials):
    trial = search.next_trial(study, n_trials, SAMPLER)
    if trial is None:
        return None
    values = search.suggest(trial, SPACE)
    study.tell(trial, 0.5)
    return trial.number, values


def test_each_trial_draws_from_its_own_seed_reproducibly():
    first = [draw(optuna.create_study(sampler=search.make_sampler(SAMPLER)), 1) for _ in range(2)]
    assert first[0] == first[1]  # a fresh study, the same seed: the same trial 0
    study = optuna.create_study(sampler=search.make_sampler(SAMPLER))
    draws = [draw(study, 4) for _ in range(5)]
    assert draws[4] is None  # n_trials reached
    assert len({tuple(sorted(values.items())) for _, values in draws[:4]}) == 4
    assert 1e-4 <= draws[0][1]["lr"] <= 1e-1 and draws[0][1]["batch_size"] in (16, 32, 64)


def test_a_second_worker_does_not_repeat_the_first_workers_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    workers = [optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                   sampler=search.make_sampler(SAMPLER)) for _ in range(2)]
    draws = [draw(workers[i % 2], 6) for i in range(6)]
    assert [number for number, _ in draws] == list(range(6))
    assert len({tuple(sorted(values.items())) for _, values in draws}) == 6


def test_running_trials_count_towards_n_trials():
    study = optuna.create_study()
    study.ask()  # another worker's trial, still running
    assert search.next_trial(study, 1, SAMPLER) is None
    assert search.next_trial(study, 2, SAMPLER).number == 1


def test_a_trial_of_a_dead_process_is_failed_and_live_ones_are_kept(tracking_uri):
    study = optuna.create_study(study_name="abandoned")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    trials = [study.ask() for _ in range(4)]
    trials[0].set_user_attr("worker", f"{search.socket.gethostname()}:{dead}")
    trials[1].set_user_attr("worker", search._worker())  # this very process: alive
    trials[1].set_user_attr("worker_started", search._started(os.getpid()))
    trials[2].set_user_attr("worker", "another-host:1")  # cannot be checked from here: kept
    trials[3].set_user_attr("worker", search._worker())  # this pid, reused: its process started later than the trial's
    trials[3].set_user_attr("worker_started", search._started(os.getpid()) - 60)
    assert search.fail_abandoned_trials(study) == [0, 3]
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING", "RUNNING", "FAIL"]
    assert search.fail_abandoned_trials(study) == []  # a second worker finds nothing left to fail


def test_a_search_needs_a_storage_and_known_sampler():
    cfg = OmegaConf.create({"study_name": "s", "storage": None, "direction": "maximize", "sampler": SAMPLER,
                            "pruner": {"name": "MedianPruner"}, "heartbeat_interval": None, "grace_period": None})
    with pytest.raises(UserError, match="set hydra.sweeper.storage"):
        search.load_study(cfg)
    cfg.storage, cfg.sampler = "sqlite:///:memory:", {"name": "NoSuchSampler"}
    with pytest.raises(UserError, match="cannot create study 's'"):
        search.load_study(cfg)


def test_heartbeats_need_an_rdb_storage(tmp_path):
    cfg = OmegaConf.create({"study_name": "s", "storage": f"journal://{tmp_path}/optuna.log", "direction": "maximize",
                            "sampler": SAMPLER, "pruner": {"name": "MedianPruner"}, "heartbeat_interval": 1,
                            "grace_period": None})
    with pytest.raises(UserError, match=r"^hparams_search: heartbeats need an RDB storage \(sqlite:/// or postgres"):
        search.load_study(cfg)
    storage = search.make_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=3)
    assert (storage.get_heartbeat_interval(), storage.grace_period) == (1, 3)


def test_an_unknown_parameter_type_is_a_user_error():
    with pytest.raises(UserError, match="has type 'loguniform'; use float, int, categorical or subset"):
        search.suggest(optuna.create_study().ask(), OmegaConf.create({"lr": {"type": "loguniform"}}))


def test_a_subset_parameter_samples_non_empty_lists_of_its_choices_one_flag_each():
    space = OmegaConf.create({"backbones": {"type": "subset", "choices": ["a", "b", "c"]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn, pruned = [], 0
    for _ in range(40):
        trial = study.ask()
        try:
            drawn.append(search.suggest(trial, space)["backbones"])
        except optuna.TrialPruned:
            pruned += 1
            assert not any(trial.params.values())  # only an empty draw is pruned
            continue
        assert set(trial.params) == {"backbones.a", "backbones.b", "backbones.c"}
        assert drawn[-1] == [c for c in "abc" if trial.params[f"backbones.{c}"]]
    assert {tuple(d) for d in drawn} == {("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")}
    assert 0 < pruned < 15  # 1 draw in 8 is empty
