import io
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image

from src import register
from src.config import PROJECT_ROOT, UserError
from src.export import log_pyfunc_model
from src.pipeline import run_job
from src.selection import COSTS, LATENCY, LOSS, PASSES, SCORE, SIZE
from tests.helpers import export_tiny

EXPERIMENT = "flowers102"


@pytest.fixture(scope="module")
def saved_model(tiny_backbone, tmp_path_factory):
    return export_tiny(tiny_backbone, ["a", "b", "c"], tmp_path_factory.mktemp("m") / "flowers" / "1", top_k=3)[1]


@pytest.fixture
def log_run(saved_model, tracking_uri):
    """A finished run with the given validation metrics and a real pyfunc model."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    mlflow.set_experiment(EXPERIMENT)

    def log(val_accuracy, val_loss=1.0, parent=None, with_model=True, validation="validation",
            metric="val/accuracy_best", cost=None):
        tags = {"backbone": "tiny", "dataset": "synthetic", "dataset_version": "v1", "git_commit": "abc",
                "validation_split": validation, **({"selection.metric": metric} if metric else {})}
        if parent:
            tags["mlflow.parentRunId"] = parent
        with mlflow.start_run(tags=tags) as run:
            mlflow.log_metrics({SCORE: val_accuracy, LOSS: val_loss, "val/accuracy_best": val_accuracy,
                                "test/accuracy": val_accuracy - 0.05, "test/top5_accuracy": 0.99, **(cost or {})})
            if with_model:
                log_pyfunc_model(saved_model, [buffer.getvalue()])
        return run.info.run_id
    return log


def test_the_best_run_by_its_score_becomes_version_1_and_champion_with_its_metrics(log_run):
    log_run(0.70)
    best = log_run(0.80, val_loss=0.9)
    log_run(0.80, val_loss=1.1)  # same accuracy, higher loss: loses the tie
    outcome = register.register_best(mlflow.MlflowClient(), EXPERIMENT, "flowers")
    assert int(outcome.version.version) == int(outcome.champion.version) == 1
    assert outcome.champion.run_id == best and "is now the champion" in outcome.message
    tags = outcome.champion.tags
    assert (float(tags["selection_score"]), float(tags["selection_loss"])) == (0.80, 0.9)
    assert float(tags["val_accuracy"]) == 0.80 and tags["selection_metric"] == "val/accuracy_best"
    assert float(tags["test_accuracy"]) == pytest.approx(0.75) and float(tags["test_top5_accuracy"]) == 0.99
    assert (tags["backbone"], tags["run_id"], tags["data_version"]) == ("tiny", best, "v1")
    assert tags["validation_split"] == "validation"
    assert not set(COSTS) & set(tags)  # a run logged before its serving cost was measured
    loaded = mlflow.pyfunc.load_model("models:/flowers@champion")
    assert loaded.metadata.run_id == best


def test_a_trained_run_logs_its_serving_cost_and_its_registered_version_carries_it(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"model": {"tta": "flip", "augmentation": {"enabled": False}}})
    metrics = run_job(cfg, tmp_path / "job")
    client = mlflow.MlflowClient()
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    cost = {name: run.data.metrics[name] for name in COSTS}
    assert cost == {name: metrics[name] for name in COSTS} and all(value > 0 for value in cost.values())
    assert cost[PASSES] == 2  # one backbone, two views: the image and its mirror
    version = register.register_best(client, cfg.tracking.experiment_name, "flowers").version
    assert {name: float(version.tags[name]) for name in COSTS} == cost


def test_a_worse_run_is_registered_but_the_champion_stays_and_a_better_one_takes_the_alias(log_run):
    client = mlflow.MlflowClient()
    first = log_run(0.80)
    register.register_best(client, EXPERIMENT, "flowers")
    worse = log_run(0.60)
    outcome = register.register_best(client, EXPERIMENT, "flowers", run_id=worse)
    assert (int(outcome.version.version), int(outcome.champion.version)) == (2, 1)
    assert "does not beat the champion" in outcome.message and "the alias stays" in outcome.message
    equal = log_run(0.80)  # a tie on accuracy and loss does not move it either
    assert register.register_best(client, EXPERIMENT, "flowers", run_id=equal).champion.run_id == first
    better = log_run(0.90)
    outcome = register.register_best(client, EXPERIMENT, "flowers")
    assert outcome.champion.run_id == better and int(outcome.champion.version) == 4
    assert "it was version 1" in outcome.message
    assert client.get_model_version_by_alias("flowers", "champion").run_id == better


def test_a_full_tie_goes_to_the_earlier_run_with_no_hand_in_it(log_run):
    first = log_run(0.80, val_loss=0.9)
    log_run(0.80, val_loss=0.9)
    assert register.best_run(mlflow.MlflowClient(), EXPERIMENT).info.run_id == first


@pytest.mark.parametrize("other, shown", [
    ({"validation": "validation[:30%]"}, "synthetic/v1/validation[:30%]/val/accuracy_best"),
    ({"metric": "cv/accuracy"}, "synthetic/v1/validation/cv/accuracy"),
])
def test_a_run_selected_on_other_data_or_another_metric_does_not_take_the_alias(log_run, other, shown):
    client = mlflow.MlflowClient()
    first = log_run(0.80)
    register.register_best(client, EXPERIMENT, "flowers")
    outcome = register.register_best(client, EXPERIMENT, "flowers", run_id=log_run(0.95, **other))
    assert outcome.champion.run_id == first and "do not compare; the alias stays" in outcome.message
    assert shown in outcome.message


def test_the_champion_is_compared_by_its_version_tags_even_when_its_run_is_gone(log_run):
    client = mlflow.MlflowClient()
    first = log_run(0.80)
    register.register_best(client, EXPERIMENT, "flowers")
    client.delete_run(first)
    better = log_run(0.85)
    assert register.register_best(client, EXPERIMENT, "flowers").champion.run_id == better


def test_registering_the_same_run_again_adds_no_version(log_run):
    client = mlflow.MlflowClient()
    log_run(0.8)
    register.register_best(client, EXPERIMENT, "flowers")
    outcome = register.register_best(client, EXPERIMENT, "flowers")
    assert "already the champion" in outcome.message
    assert len(client.search_model_versions("name = 'flowers'")) == 1


def test_runs_selected_on_different_metrics_are_not_ranked_together_until_one_metric_is_chosen(log_run):
    """A CV score (models fitted on 4/5 of train + validation) is higher than a val score of the same model, so
    ranking both in one list would always pick a CV run."""
    client = mlflow.MlflowClient()
    held_out = log_run(0.90)
    cross_validated = log_run(0.94, metric="cv/accuracy")
    with pytest.raises(UserError, match=r"different metrics \((cv/accuracy: 1 run, val/accuracy_best: 1 run|"
                                        r"val/accuracy_best: 1 run, cv/accuracy: 1 run)\).*--selection-metric"):
        register.register_best(client, EXPERIMENT, "flowers")
    assert client.search_registered_models() == []
    assert register.best_run(client, EXPERIMENT, selection_metric="val/accuracy_best").info.run_id == held_out
    outcome = register.register_best(client, EXPERIMENT, "flowers", selection_metric="cv/accuracy")
    assert outcome.champion.run_id == cross_validated
    with pytest.raises(UserError, match="no finished run selected on cv/accuracy2"):
        register.best_run(client, EXPERIMENT, selection_metric="cv/accuracy2")
    log_run(0.99, metric=None)  # logged by another tool: the best score, and no selection.metric tag
    with pytest.raises(UserError, match=r"no selection.metric tag: 1 run"):
        register.best_run(client, EXPERIMENT)


def test_a_sweep_scope_picks_the_best_of_that_sweeps_jobs(log_run):
    sweep = log_run(0.0, with_model=False)
    log_run(0.99)  # better, but not in the sweep
    job = log_run(0.7, parent=sweep)
    assert register.best_run(mlflow.MlflowClient(), EXPERIMENT, sweep_run_id=sweep).info.run_id == job


def test_a_latency_limit_passes_over_a_more_accurate_but_slower_run_and_runs_not_measured(log_run, caplog):
    log_run(0.95, cost={SIZE: 10.0})  # logged before latency was measured
    log_run(0.90, cost={LATENCY: 45.0, SIZE: 10.0})
    fast = log_run(0.85, cost={LATENCY: 12.0, SIZE: 30.0})
    log_run(0.80, cost={LATENCY: 8.0, SIZE: 5.0})
    outcome = register.register_best(mlflow.MlflowClient(), EXPERIMENT, "flowers", limits={LATENCY: 30})
    assert outcome.champion.run_id == fast and float(outcome.version.tags[LATENCY]) == 12.0
    assert "1 of 4 runs have no cost/latency_ms_p50 (logged before it was measured): left out" in caplog.text
    assert register.best_run(mlflow.MlflowClient(), EXPERIMENT, limits={LATENCY: 30, SIZE: 20}).data.metrics[
        SCORE] == 0.80


def test_a_limit_replaces_a_champion_over_it_even_by_a_run_no_better_on_validation(log_run):
    client = mlflow.MlflowClient()
    slow = log_run(0.90, cost={LATENCY: 45.0, SIZE: 10.0})
    assert register.register_best(client, EXPERIMENT, "flowers").champion.run_id == slow
    fast = log_run(0.85, cost={LATENCY: 12.0, SIZE: 30.0})
    assert register.register_best(client, EXPERIMENT, "flowers").champion.run_id == slow  # no limit: as before
    outcome = register.register_best(client, EXPERIMENT, "flowers", limits={LATENCY: 30})
    assert outcome.champion.run_id == fast == client.get_model_version_by_alias("flowers", "champion").run_id
    assert outcome.message.endswith("it was version 1 (val/accuracy_best 0.9000), over the limit: "
                                    "cost/latency_ms_p50 45.0 ms > 30")
    # a champion within the limit is kept unless beaten, as without limits: here by the best of a sweep
    sweep = log_run(0.0, with_model=False)
    log_run(0.80, parent=sweep, cost={LATENCY: 8.0, SIZE: 5.0})
    outcome = register.register_best(client, EXPERIMENT, "flowers", sweep_run_id=sweep, limits={LATENCY: 30})
    assert outcome.champion.run_id == fast and "does not beat" in outcome.message
    assert register.register_best(client, EXPERIMENT, "flowers", limits={LATENCY: 30}).message.endswith(
        "is already the champion")


def test_no_run_within_the_limits_says_what_the_cheapest_runs_cost_and_leaves_the_registry_as_it_was(log_run):
    client = mlflow.MlflowClient()
    old = log_run(0.95)  # logged before its serving cost was measured
    with pytest.raises(UserError, match="no run has cost/latency_ms_p50 .*; train again, or drop the limit"):
        register.best_run(client, EXPERIMENT, limits={LATENCY: 30})
    register.register_best(client, EXPERIMENT, "flowers")
    log_run(0.90, cost={LATENCY: 45.0, SIZE: 10.0})
    log_run(0.85, cost={LATENCY: 20.0, SIZE: 60.0})
    with pytest.raises(UserError) as error:
        register.register_best(client, EXPERIMENT, "flowers", limits={LATENCY: 30, SIZE: 50})
    message = str(error.value)
    assert message.startswith("no run is within cost/latency_ms_p50 <= 30 ms and model/size_mb <= 50 MB: the "
                              "fastest, run ") and "\n" not in message
    assert "has 20.0 ms and 60.0 MB; the smallest, run " in message and "has 45.0 ms and 10.0 MB; raise" in message
    [version] = client.search_model_versions("name = 'flowers'")
    assert version.run_id == old == client.get_model_version_by_alias("flowers", "champion").run_id


def test_bad_requests_raise_one_line_errors_and_register_nothing(log_run):
    client = mlflow.MlflowClient()
    with pytest.raises(UserError, match="no MLflow experiment 'nope'"):
        register.register_best(client, "nope", "flowers")
    with pytest.raises(UserError, match="no finished run with selection/score"):
        register.register_best(client, EXPERIMENT, "flowers")
    with pytest.raises(UserError, match="no run 0123"):
        register.register_best(client, EXPERIMENT, "flowers", run_id="0123")
    without_model = log_run(0.9, with_model=False)
    with pytest.raises(UserError, match="has no logged model"):
        register.register_best(client, EXPERIMENT, "flowers", run_id=without_model)
    assert client.search_registered_models() == []


def test_the_script_prints_the_outcome_and_fails_in_one_line(log_run, tracking_uri):
    log_run(0.8)
    script = [sys.executable, "scripts/register_best.py"]
    done = subprocess.run([*script, "--name", "roses"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "roses version 1 (val/accuracy_best 0.8000) is now the champion" in done.stdout
    failed = subprocess.run([*script, "--experiment", "nope"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: no MLflow experiment 'nope'")
    log_run(0.7, cost={LATENCY: 40.0, SIZE: 5.0})
    over = subprocess.run([*script, "--max-latency-ms", "30", "--max-size-mb", "50"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True)
    assert over.returncode == 1 and "1 of 2 runs have no cost/latency_ms_p50" in over.stderr
    assert over.stderr.strip().splitlines()[-1].startswith("error: no run is within cost/latency_ms_p50 <= 30 ms")
    log_run(0.95, metric="cv/accuracy")
    mixed = subprocess.run(script, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert mixed.returncode == 1 and mixed.stderr.strip().splitlines()[-1].startswith(
        f"error: the finished runs in experiment '{EXPERIMENT}' were selected on different metrics")
    chosen = subprocess.run([*script, "--selection-metric", "cv/accuracy"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True)
    assert chosen.returncode == 0 and "flowers version 1 (cv/accuracy 0.9500) is now the champion" in chosen.stdout
