"""Sweeps through the command line, on synthetic data with the tiny backbone: Hydra grids, the Optuna sweeper,
resume after SIGKILL, parallel workers on the journal storage and on PostgreSQL, heartbeats, and a team tracking
server."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest

from src.config import PROJECT_ROOT
from src.search import make_storage
from src.serve import free_port
from tests.conftest import TEST_HEAD
from tests.helpers import running

FAST = [*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", "backbone.name=tiny", "trainer.verbose=0"]


def command(tmp_path, tiny_backbone, *overrides):
    return [sys.executable, "train.py", "-m", *FAST, f"backbone.handle={tiny_backbone}", *overrides,
            f"tracking.artifact_location={tmp_path}/art", f"paths.cache_dir={tmp_path}/cache",
            f"hydra.sweep.dir={tmp_path}/multirun/{uuid.uuid4().hex[:8]}"]


def environment(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2"}


def sweep(tmp_path, tiny_backbone, *overrides):
    result = subprocess.run(command(tmp_path, tiny_backbone, *overrides), cwd=PROJECT_ROOT,
                            env=environment(tmp_path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def all_runs(tmp_path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True)


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["tags.sweep"] == "true"]


def children(runs: pd.DataFrame, parent_id: str) -> pd.DataFrame:
    return runs[runs["tags.mlflow.parentRunId"] == parent_id]


def sweep_jobs(tmp_path, tiny_backbone, *overrides):
    """Run one sweep; return its output, the parent run id and the child runs."""
    result = sweep(tmp_path, tiny_backbone, *overrides)
    runs = all_runs(tmp_path)
    [parent] = sweep_runs(runs).itertuples()
    return result, parent.run_id, children(runs, parent.run_id)


def test_grid_sweep_runs_every_combination_under_one_parent_with_a_summary(tmp_path, tiny_backbone):
    result, parent_id, jobs = sweep_jobs(tmp_path, tiny_backbone, "lr=0.01,0.05", "batch_size=16,32",
                                         "model.dropout=0.1,0.3", "epochs=1", "model.augmentation.enabled=false")
    assert len(jobs) == 8 and set(jobs["status"]) == {"FINISHED"}
    progress = [line.split(" - ")[-1] for line in (result.stdout + result.stderr).splitlines() if "] - job " in line]
    assert [line.split(":")[0] for line in progress] == [f"job {i}/8" for i in range(1, 9)]
    combos = set(zip(jobs["params.lr"], jobs["params.batch_size"], jobs["params.model.dropout"]))
    assert len(combos) == 8
    client = mlflow.MlflowClient()
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="summary.csv"))
    assert len(summary) == 8 and summary["selection/score"].is_monotonic_decreasing
    assert {a.path for a in client.list_artifacts(parent_id)} == {"summary.csv", "summary.md"}
    # the best by hand: the highest val accuracy, then the lowest val NLL, then the earliest
    ranked = sorted(((r["metrics.val/accuracy_best"], -r["metrics.val/nll"], -r["start_time"].timestamp(),
                      r["run_id"]) for _, r in jobs.iterrows()), reverse=True)
    best = jobs.set_index("run_id").loc[ranked[0][3]]
    parent_run = client.get_run(parent_id)
    assert parent_run.data.tags["best_run_id"] == ranked[0][3] == summary["run_id"][0]
    assert parent_run.data.metrics["best/selection/score"] == best["metrics.val/accuracy_best"]
    assert parent_run.data.tags["selection.metric"] == "val/accuracy_best"
    assert parent_run.data.metrics["best/test/accuracy"] == best["metrics.test/accuracy"]
    assert parent_run.info.status == "FINISHED"


def test_joblib_launcher_jobs_share_the_parent_and_the_best_is_registered_when_asked(tmp_path, tiny_backbone):
    _, parent_id, jobs = sweep_jobs(tmp_path, tiny_backbone, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                    "lr=0.01,0.05", "epochs=1", "model.augmentation.enabled=false",
                                    "registry.register_after_sweep=true")
    assert sorted(jobs["params.lr"]) == ["0.01", "0.05"] and set(jobs["status"]) == {"FINISHED"}
    champion = mlflow.MlflowClient().get_model_version_by_alias("flowers", "champion")
    assert champion.run_id == mlflow.MlflowClient().get_run(parent_id).data.tags["best_run_id"]


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_backbone):
    result, parent_id, jobs = sweep_jobs(tmp_path, tiny_backbone, "lr=-1,0.05", "epochs=1",
                                         "model.augmentation.enabled=false")
    jobs = jobs.set_index("params.lr")
    assert jobs.loc["-1", "status"] == "FAILED"
    assert jobs.loc["-1", "tags.error"].startswith("UserError: lr=-1 is invalid")
    assert jobs.loc["0.05", "status"] == "FINISHED"
    assert mlflow.MlflowClient().get_run(parent_id).data.metrics["jobs_failed"] == 1
    assert "lr=-1 is invalid" in result.stdout + result.stderr


SEARCH = ["hparams_search=mobilenet_v2", "epochs=4", "model.augmentation.enabled=false",
          "hydra.sweeper.params.lr.low=0.003", "hydra.sweeper.params.lr.high=0.3", "model.normalize_features=false",
          # Prune any trial still below 0.3 val accuracy (chance is 0.25) at its second epoch.
          "~hydra.sweeper.pruner.n_startup_trials", "hydra.sweeper.pruner.name=ThresholdPruner",
          "+hydra.sweeper.pruner.lower=0.3", "hydra.sweeper.pruner.n_warmup_steps=2"]


def search(tmp_path, storage, n_trials, study="test_study"):
    return [*SEARCH, f"hydra.sweeper.storage={storage}", f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweeper.study_name={study}"]


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def test_optuna_search_prunes_and_records_every_trial(tmp_path, tiny_backbone):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    result = sweep(tmp_path, tiny_backbone, *search(tmp_path, storage, 6))
    study = optuna.load_study(study_name="test_study", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(finished(study)) == 6 == len(states), states
    progress = re.findall(r"(trial \d+/\d+) \((.*) so far\)", result.stdout + result.stderr)
    assert [trial for trial, _ in progress] == [f"trial {i}/6" for i in range(1, 7)], result.stderr[-2000:]
    assert progress[0][1] == "0 complete, 0 pruned, 0 fail"
    assert "PRUNED" in states and "COMPLETE" in states, states
    assert all(set(t.params) == {"lr", "batch_size", "model.dropout"} for t in study.trials)

    runs = all_runs(tmp_path)
    [parent] = sweep_runs(runs).itertuples()
    trials = children(runs, parent.run_id).set_index("tags.optuna.trial")
    assert sorted(trials.index.astype(int)) == [t.number for t in study.trials]
    for trial in study.trials:
        run = trials.loc[str(trial.number)]
        assert float(run["params.lr"]) == pytest.approx(trial.params["lr"])
        assert int(run["params.batch_size"]) == trial.params["batch_size"]
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert (run["status"], run["tags.optuna.state"]) == ("KILLED", "PRUNED")
            assert pd.isna(run["metrics.test/accuracy"])  # stopped before the test evaluation
        else:
            assert run["status"] == "FINISHED"
            assert run["metrics.val/accuracy_best"] == pytest.approx(trial.value)
            assert not pd.isna(run["metrics.test/accuracy"])  # logged, but never the objective

    parent_run = mlflow.MlflowClient().get_run(parent.run_id)
    assert parent_run.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    assert parent_run.data.metrics["optuna/best_value"] == study.best_value
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id, "optuna")}
    assert artifacts == {"optuna/optimization_history.png", "optuna/param_importances.png"}


def test_a_search_whose_trials_keep_failing_stops_and_ends_its_sweep_run_failed(tmp_path, tiny_backbone):
    overrides = search(tmp_path, f"sqlite:///{tmp_path}/optuna.db", 6)
    result = subprocess.run(command(tmp_path, tiny_backbone, *overrides, "epochs=0"), cwd=PROJECT_ROOT,
                            env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "3 trials in a row failed" in result.stderr
    runs = all_runs(tmp_path)
    [parent] = sweep_runs(runs).itertuples()
    jobs = children(runs, parent.run_id)
    assert len(jobs) == 3 and set(jobs["status"]) == {"FAILED"}
    parent_run = mlflow.MlflowClient().get_run(parent.run_id)
    assert parent_run.info.status == "FAILED" and parent_run.data.metrics["jobs_failed"] == 3


def test_rerunning_resumes_the_study_after_sigkill(tmp_path, tiny_backbone):
    url = f"sqlite:///{tmp_path}/optuna.db"
    overrides = search(tmp_path, url, 6)
    storage = make_storage(url)  # its tables, before the worker creates them too
    first = subprocess.Popen(command(tmp_path, tiny_backbone, *overrides), cwd=PROJECT_ROOT,
                             env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            done = finished(optuna.load_study(study_name="test_study", storage=storage))
        except KeyError:  # the study does not exist yet
            continue
        if len(done) >= 2:
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {t.number: (t.state, t.value, t.params) for t in finished(optuna.load_study(study_name="test_study",
                                                                                         storage=storage))}
    assert 2 <= len(before) < 6

    sweep(tmp_path, tiny_backbone, *overrides)
    study = optuna.load_study(study_name="test_study", storage=storage)
    after = {t.number: (t.state, t.value, t.params) for t in finished(study)}
    assert len(after) == 6
    assert {n: after[n] for n in before} == before  # nothing finished was lost or redone
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def run_workers(tmp_path, tiny_backbone, storage, n_trials, workers=2):
    overrides = search(tmp_path, storage, n_trials, study="parallel")
    processes = [subprocess.Popen(command(tmp_path, tiny_backbone, *overrides), cwd=PROJECT_ROOT,
                                  env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(workers)]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=900)
            assert process.returncode == 0, stderr[-3000:]
    finally:  # a failed worker leaves no other running into the next tests
        for process in processes:
            process.kill()
    study = optuna.load_study(study_name="parallel", storage=make_storage(storage))
    done = finished(study)
    assert len(done) == n_trials
    assert len({tuple(sorted(t.params.items())) for t in done}) == n_trials  # no two workers ran the same trial
    workers_seen = {t.user_attrs["worker"] for t in done}
    assert len(workers_seen) == workers, workers_seen  # both did share the work
    runs = all_runs(tmp_path)
    trial_runs = runs[(runs["tags.optuna.study"] == "parallel") & runs["tags.optuna.trial"].notna()]
    assert sorted(trial_runs["tags.optuna.trial"].astype(int)) == sorted(t.number for t in done)


def test_two_workers_share_a_study_on_the_journal_storage(tmp_path, tiny_backbone):
    run_workers(tmp_path, tiny_backbone, f"journal://{tmp_path}/optuna.log", n_trials=6)


def test_two_workers_share_a_study_on_postgresql(tmp_path, tiny_backbone, postgres_url):
    run_workers(tmp_path, tiny_backbone, postgres_url, n_trials=6)


def poll(condition, timeout: float, what: str):
    """condition()'s first answer other than None, asked every half second; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (answer := condition()) is not None:
            return answer
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout} s")


def trial_with_run(storage, client, study_name):
    """(a RUNNING trial, its RUNNING MLflow run), once some worker has reached training; None before."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # the study does not exist yet
        return None
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`optuna.trial` = '{trial.number}' and attributes.status = 'RUNNING'")
        if runs:
            return trial, runs[0]
    return None


def test_a_worker_that_stops_beating_has_its_trial_failed_and_replaced_by_the_other(tmp_path, tiny_backbone,
                                                                                     postgres_url):
    storage, n_trials = make_storage(postgres_url), 3  # its tables, before the workers race to create them
    overrides = ["hparams_search=mobilenet_v2", "epochs=10", "model.normalize_features=false",  # not pruned
                 f"hydra.sweeper.storage={postgres_url}", f"hydra.sweeper.n_trials={n_trials}",
                 "hydra.sweeper.study_name=beats", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    processes = [subprocess.Popen(command(tmp_path, tiny_backbone, *overrides), cwd=PROJECT_ROOT,
                                  env=environment(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True) for log in logs]
    workers = {process.pid: process for process in processes}
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        trial, run = poll(lambda: trial_with_run(storage, mlflow.MlflowClient(), "beats"), 600, "trial in training")
        victim = workers.pop(int(trial.user_attrs["worker"].rpartition(":")[2]))
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = datetime.now()
        victim.wait(timeout=30)
        [survivor] = workers.values()
        assert survivor.wait(timeout=600) == 0, logs[processes.index(survivor)].name
        ended_at = datetime.now()
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs:
            log.close()

    study = optuna.load_study(study_name="beats", storage=storage)
    killed = study.trials[trial.number]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert len(finished(study)) == n_trials and not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    killed_run = mlflow.MlflowClient().get_run(run.info.run_id)
    assert (killed_run.info.status, killed_run.data.tags["error"]) == ("KILLED", "stale: its worker stopped beating")
    run_ended = datetime.fromtimestamp(killed_run.info.end_time / 1000)
    seconds = {what: round((at - killed_at).total_seconds(), 1) for what, at in
               [("trial failed", killed.datetime_complete), ("run killed", run_ended), ("study finished", ended_at)]}
    print(f"trial {trial.number} SIGKILLed at {killed_at:%H:%M:%S}; seconds after the kill: {seconds}")


def test_optuna_searches_which_backbones_to_concatenate(tmp_path, tiny_backbone):
    """hparams_search=multi_backbone over two backbones, here two copies of the tiny one under offline names."""
    backbones_dir = tmp_path / "backbones"
    backbones_dir.mkdir()
    names = ["mobilenet_v1_100_224", "efficientnet_lite0_224"]
    for name in names:
        (backbones_dir / name).symlink_to(tiny_backbone)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep(tmp_path, tiny_backbone, "hparams_search=multi_backbone", "epochs=2", f"paths.backbones_dir={backbones_dir}",
          f"hydra.sweeper.params.backbones.choices=[{','.join(names)}]", f"hydra.sweeper.storage={storage}",
          "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.n_startup_trials=6", "hydra.sweeper.study_name=subsets")
    study = optuna.load_study(study_name="subsets", storage=storage)
    assert len(study.trials) == 6
    runs = all_runs(tmp_path).set_index("tags.optuna.trial")
    for trial in study.trials:
        chosen = [n for n in names if trial.params[f"backbones.{n}"]]
        if not chosen:  # pruned before it ran: no MLflow run
            assert trial.state == optuna.trial.TrialState.PRUNED and str(trial.number) not in runs.index
            continue
        run = runs.loc[str(trial.number)]
        assert run["status"] == "FINISHED" and run["tags.backbone"] == "+".join(chosen)
    ran = {runs.loc[str(t.number), "tags.backbone"] for t in study.trials if str(t.number) in runs.index}
    assert len(ran) >= 2  # different subsets were tried


def test_a_sweep_logs_its_runs_and_artifacts_through_the_tracking_server_and_registers_its_best(
        tmp_path, tiny_backbone, new_postgres_url):
    port, artifacts = free_port(), tmp_path / "server_artifacts"
    server_env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": new_postgres_url, "ARTIFACTS_DIR": str(artifacts),
                  "MLFLOW_PORT": str(port)}
    with running([sys.executable, "scripts/tracking_server.py", "--workers", "1"], port, server_env, "/health") as url:
        env = {**environment(tmp_path), "MLFLOW_TRACKING_URI": url}
        result = subprocess.run(command(tmp_path, tiny_backbone, "lr=0.01,0.05", "epochs=1",
                                        "model.augmentation.enabled=false"),
                                cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        mlflow.set_tracking_uri(url)
        runs = mlflow.search_runs(search_all_experiments=True)
        [parent] = sweep_runs(runs).itertuples()
        jobs = children(runs, parent.run_id)
        assert len(jobs) == 2 and set(jobs["status"]) == {"FINISHED"}
        best = mlflow.MlflowClient().get_run(parent.run_id).data.tags["best_run_id"]
        model = mlflow.artifacts.download_artifacts(f"runs:/{best}/model", dst_path=str(tmp_path / "download"))
        assert (Path(model) / "MLmodel").is_file()
        assert mlflow.get_run(best).info.artifact_uri.startswith("mlflow-artifacts:")
        assert len(list(artifacts.rglob("MLmodel"))) == 2 and not (tmp_path / "art").exists()
        registered = subprocess.run([sys.executable, "scripts/register_best.py", "--sweep", parent.run_id],
                                    cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert registered.returncode == 0, registered.stderr[-3000:]
        assert mlflow.MlflowClient().get_model_version_by_alias("flowers", "champion").run_id == best
        champion = mlflow.artifacts.download_artifacts("models:/flowers@champion", dst_path=str(tmp_path / "champion"))
        assert (Path(champion) / "MLmodel").is_file()  # what serve-best loads
    mlflow.set_tracking_uri(None)


SHIFTED = ["trainer.select_on=mean", "robustness.per_class=1", "model.normalize_features=true",
           "model.augmentation.enabled=false", "epochs=3"]


def test_a_sweep_and_a_search_select_on_the_mean_of_clean_and_shifted_validation(tmp_path, tiny_backbone):
    _, parent_id, jobs = sweep_jobs(tmp_path, tiny_backbone, *SHIFTED, "lr=0.003,0.3")
    mean = (jobs["metrics.val/accuracy_best"] + jobs["metrics.val/shifted_accuracy_best"]) / 2
    assert (jobs["metrics.val/accuracy_best"] != mean).any()  # the shifted images count: not clean accuracy again
    assert list(jobs["metrics.selection/score"]) == pytest.approx(list(mean))
    parent = mlflow.MlflowClient().get_run(parent_id)
    assert parent.data.tags["selection.metric"] == "val/mean_accuracy_best"
    assert parent.data.metrics["best/selection/score"] == pytest.approx(mean.max())

    storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep(tmp_path, tiny_backbone, *SHIFTED, "hparams_search=mobilenet_v2", f"hydra.sweeper.storage={storage}",
          "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=shifted", "hydra.sweeper.params.lr.low=0.003",
          "hydra.sweeper.params.lr.high=0.3")
    study = optuna.load_study(study_name="shifted", storage=storage)
    runs = all_runs(tmp_path)
    trials = runs[runs["tags.optuna.trial"].notna()].set_index("tags.optuna.trial")
    assert len(finished(study)) == 2
    for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        run = trials.loc[str(trial.number)]
        assert trial.value == pytest.approx(
            (run["metrics.val/accuracy_best"] + run["metrics.val/shifted_accuracy_best"]) / 2)
