"""Reports: the table and per-configuration summary built from a small synthetic MLflow store, the files and the
`report` run they make, and `experiment=<name>` sweeps reported end to end on synthetic data."""

import os
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from src import report, selection, shifts
from src.config import CONF_DIR, PROJECT_ROOT, UserError
from src.selection import LATENCY, LOSS, PASSES, SCORE, SIZE
from src.sweep import summarize
from tests.conftest import compose_config

CLASSES = ["red", "green", "blue", "yellow"]


def log_run(client, experiment_id, backbone, lr, seed, val, test, *, val_loss=0.5, status="FINISHED",
            parent=None, curve=(0.5, 0.7), cost=None):
    tags = {"mlflow.runName": f"{backbone}-lr{lr:g}-seed{seed}"} | ({"mlflow.parentRunId": parent} if parent else {})
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    params = {"backbone.name": backbone, "lr": str(lr), "batch_size": "32", "model.dropout": "0.2",
              "model.label_smoothing": "0.1", "model.augmentation.enabled": "False",
              "model.normalize_features": "True", "seed": str(seed)}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    if status == "FINISHED":
        metrics = {SCORE: val, LOSS: val_loss, "val/accuracy_best": val, "val/loss_at_best": val_loss,
                   "test/accuracy": test,
                   "test/top5_accuracy": min(1.0, test + 0.1), "epochs_trained": len(curve), "best_epoch": len(curve),
                   "time/train_s": 3.0, "model/size_mb": 12.5, **(cost or {})}
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for step, value in enumerate(curve, start=1):
            client.log_metric(run_id, "val/accuracy", value, step=step)
    else:
        client.set_tag(run_id, "error", "ValueError: boom")
    client.set_terminated(run_id, status)
    return run_id


def log_evaluation(client, run_id, tmp_path):
    """What the pipeline logs for a run on data=synthetic: its config, test predictions and confusion matrix."""
    labels = np.repeat(np.arange(4), 20)
    predicted = labels.copy()
    predicted[[0, 1, 2, 25, 45]] = [1, 1, 2, 0, 3]  # five mistakes in the 80 synthetic test images
    folder = tmp_path / f"evaluation-{run_id}"
    folder.mkdir()
    predictions = pd.DataFrame({"label": labels, "predicted": predicted,
                                "confidence": np.linspace(0.3, 0.99, 80)}).rename_axis("index")
    predictions.to_csv(folder / "test_predictions.csv")
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    pd.DataFrame(confusion, index=pd.Index(CLASSES, name="true"), columns=CLASSES).to_csv(
        folder / "test_confusion_matrix.csv")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose_config("data=synthetic"), resolve=True))
    client.log_artifacts(run_id, str(folder))


@pytest.fixture
def store(tracking_uri, tmp_path):
    """Experiment "grid": two backbones, one of them over 3 seeds at two lrs, a failed run, a sweep run."""
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("grid", artifact_location=str(tmp_path / "artifacts"))
    sweep = client.create_run(experiment_id, tags={"sweep": "true", "mlflow.runName": "sweep-1"}).info.run_id
    ids = {}
    for seed, (val, test) in zip((1, 2, 3), ((0.80, 0.78), (0.82, 0.80), (0.84, 0.79))):
        ids["a", 0.01, seed] = log_run(client, experiment_id, "a", 0.01, seed, val, test, parent=sweep)
    ids["a", 0.1, 1] = log_run(client, experiment_id, "a", 0.1, 1, 0.70, 0.72, parent=sweep)
    ids["b", 0.01, 1] = log_run(client, experiment_id, "b", 0.01, 1, 0.86, 0.81, val_loss=0.4, parent=sweep,
                                curve=(0.6, 0.86, 0.85))
    ids["b", 0.01, 2] = log_run(client, experiment_id, "b", 0.01, 2, 0.86, 0.83, val_loss=0.3, parent=sweep)
    ids["failed"] = log_run(client, experiment_id, "b", 0.1, 1, None, None, status="FAILED", parent=sweep)
    client.set_terminated(sweep)
    log_evaluation(client, ids["b", 0.01, 2], tmp_path)
    return client, ids, sweep


def test_table_has_one_row_per_training_run_best_on_validation_first(store):
    client, ids, sweep = store
    table = selection.runs_table(report.experiment_runs(client, "grid"))
    assert sweep not in set(table["run_id"]) and len(table) == 7
    # val 0.86 twice: the lower val loss (0.3, seed 2) wins; the failed run, without metrics, comes last
    assert list(table["run_id"]) == [ids["b", 0.01, 2], ids["b", 0.01, 1], ids["a", 0.01, 3], ids["a", 0.01, 2],
                                     ids["a", 0.01, 1], ids["a", 0.1, 1], ids["failed"]]
    assert list(table.columns[:11]) == ["run", "status", "backbone", "head", "lr", "batch_size", "dropout",
                                        "label_smoothing", "augmentation", "normalize_features", "seed"]
    assert {"selection/score", "val/accuracy_best", "test/accuracy", "test/accuracy_ci_low", "cv/accuracy",
            "git_commit", "dataset_version", "tensorflow", "keras", "mlflow", "run_id"} <= set(table.columns)
    first, last = table.iloc[0], table.iloc[-1]
    assert (first["backbone"], first["lr"], first["batch_size"], first["seed"]) == ("b", 0.01, 32, 2)
    assert (first["test/accuracy"], first["model/size_mb"], first["epochs_trained"]) == (0.83, 12.5, 2)
    assert (last["status"], last["error"]) == ("FAILED", "ValueError: boom") and pd.isna(last["val/accuracy_best"])


def test_summary_groups_seeds_of_one_configuration_with_mean_and_std(store):
    client, _, sweep = store
    # as good as b on val accuracy, worse on val loss: ranked after b, as runs are (though "aa" sorts first)
    log_run(client, client.get_experiment_by_name("grid").experiment_id, "aa", 0.01, 1, 0.86, 0.99, val_loss=0.9,
            parent=sweep)
    summary = report.summarize_configurations(selection.runs_table(report.experiment_runs(client, "grid")))
    assert [(r.backbone, r.lr, r.n) for r in summary.itertuples()] == [
        ("b", 0.01, 2), ("aa", 0.01, 1), ("a", 0.01, 3), ("a", 0.1, 1)]
    seeds = summary.iloc[2]
    assert seeds["val/accuracy_best_mean"] == pytest.approx(0.82)
    assert seeds["val/accuracy_best_std"] == pytest.approx(0.02)  # sample std of 0.80, 0.82, 0.84
    assert seeds["test/accuracy_mean"] == pytest.approx(0.79) and seeds["test/accuracy_std"] == pytest.approx(0.01)
    # a t interval on the mean of three: 0.82 +- t(0.975, 2 df) 4.3027 x 0.02 / sqrt(3)
    assert (seeds["val/accuracy_best_ci_low"], seeds["val/accuracy_best_ci_high"]) == (
        pytest.approx(0.770317, abs=1e-5), pytest.approx(0.869683, abs=1e-5))
    assert pd.isna(summary.iloc[0]["val/accuracy_best_ci_low"])  # two runs: no interval
    assert pd.isna(summary.iloc[3]["test/accuracy_std"])
    # per backbone: its configuration with the best mean val accuracy
    per_backbone = report.by_backbone(summary)
    assert [(r.backbone, r.lr, r.n) for r in per_backbone.itertuples()] == [("a", 0.01, 3), ("aa", 0.01, 1),
                                                                           ("b", 0.01, 2)]


def test_a_param_that_varies_is_shown_and_splits_configurations_a_killed_run_is_listed_not_summarised(store):
    client, ids, sweep = store
    experiment_id = client.get_experiment_by_name("grid").experiment_id
    short = log_run(client, experiment_id, "a", 0.01, 1, 0.9, 0.5, parent=sweep)
    client.log_param(short, "epochs", "2")  # e.g. a smoke run left in the experiment
    for run_id in ids.values():
        client.log_param(run_id, "epochs", "60")
    killed = log_run(client, experiment_id, "a", 0.01, 4, None, None, status="KILLED", parent=sweep)
    client.log_param(killed, "epochs", "60")
    table = selection.runs_table(report.experiment_runs(client, "grid"))
    assert "epochs" in selection.configuration_columns(table) and table.iloc[0]["run_id"] == short
    assert table.loc[table["run_id"] == killed, "status"].item() == "KILLED"
    summary = report.summarize_configurations(table)
    assert [(r.backbone, r.epochs, r.n) for r in summary.itertuples()][:2] == [("a", "2", 1), ("b", "60", 2)]
    assert summary["n"].sum() == 7  # the 6 finished runs and the short one; not the failed or killed runs


def log_predictions(client, run_id, tmp_path, correct, one_view=None, version="v1"):
    """Test predictions of 100 images (labels 0..3): right where `correct` says, else one class off."""
    labels = np.arange(100) % 4
    frame = pd.DataFrame({"label": labels, "predicted": np.where(correct, labels, (labels + 1) % 4),
                          "confidence": 0.9}).rename_axis("index")
    if one_view is not None:
        frame["predicted_single_view"] = np.where(one_view, labels, (labels + 1) % 4)
    folder = tmp_path / f"predictions-{run_id}-{version}"
    folder.mkdir()
    frame.to_csv(folder / "test_predictions.csv")
    client.log_artifacts(run_id, str(folder))
    for key, value in {"dataset": "synthetic", "dataset_version": version, "test_split": "test"}.items():
        client.set_tag(run_id, key, value)


def test_each_configuration_is_compared_with_the_declared_baseline_per_seed_and_pooled(tracking_uri, tmp_path,
                                                                                       capsys):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("techniques", artifact_location=str(tmp_path / "artifacts"))
    first_80, first_90 = np.arange(100) < 80, np.arange(100) < 90
    baseline = log_run(client, experiment_id, "a", 0.01, 1, 0.80, 0.80)
    client.log_param(baseline, "model.head", "logistic_regression")
    log_predictions(client, baseline, tmp_path, first_80)
    runs = {}
    for seed, correct in ((1, first_90), (2, first_80)):
        runs[seed] = log_run(client, experiment_id, "a", 0.01, seed, 0.85, 0.85)
        client.log_param(runs[seed], "model.head", "dense")
        log_predictions(client, runs[seed], tmp_path, correct, one_view=first_80)
        client.log_metric(runs[seed], "test/accuracy_single_view", 0.80)
    other = log_run(client, experiment_id, "b", 0.01, 1, 0.9, 0.9)  # no baseline on backbone b: not compared
    client.log_param(other, "model.head", "dense")
    log_predictions(client, other, tmp_path, first_90)

    table = selection.runs_table(report.experiment_runs(client, "techniques"))
    declared = OmegaConf.create({"where": {"model.head": "logistic_regression"}, "same": ["backbone"]})
    # scripts/report.py --baseline model.head=logistic_regression --same backbone declares the same
    assert report.declared_baseline(["model.head=logistic_regression"], ["backbone"]) == declared
    with pytest.raises(UserError, match="--baseline model.head is invalid: expected PARAM=VALUE pairs"):
        report.declared_baseline(["model.head"], [])
    capsys.readouterr()
    compared = report.comparisons(report.experiment_runs(client, "techniques"), table, declared)
    assert "per-image predictions: 100%" in capsys.readouterr().err  # one download per run, shown as they go
    served = compared[compared["view"] == "as served"].set_index("seed")
    assert list(served.index) == ["1", "2", "pooled (2)", "over seeds (2)"] and set(compared["baseline_seed"]) >= {"1"}
    # seed 1 is right on 10 images the baseline gets wrong, and wrong on none it gets right: McNemar's exact
    # two-sided p is 2 x 0.5^10
    assert served.loc["1", "difference"] == pytest.approx(0.10) and served.loc["1", "p_value"] == pytest.approx(2 / 1024)
    # the bootstrap mean of 100 draws of ten 1s in 100: about Binomial(100, 0.1) / 100, whose 95 % range is 0.05-0.16
    assert 0.03 <= served.loc["1", "ci_low"] <= 0.06 and 0.15 <= served.loc["1", "ci_high"] <= 0.17
    assert served.loc["2", "difference"] == 0 and served.loc["2", "p_value"] == 1
    assert served.loc["pooled (2)", "difference"] == pytest.approx(0.05)  # each of the 10 images right in 1 of 2
    # over the seeds' differences 0.10 and 0: mean 0.05, standard error 0.05, t(0.975, 1 df) = 12.706, t = 1
    over_seeds = served.loc["over seeds (2)"]
    assert over_seeds["difference"] == pytest.approx(0.05) and over_seeds["p_value"] == pytest.approx(0.5)
    assert over_seeds["ci_low"] == pytest.approx(0.05 - 12.706 * 0.05, abs=1e-3)
    assert over_seeds["ci_high"] == pytest.approx(0.05 + 12.706 * 0.05, abs=1e-3)
    one_view = compared[compared["view"] == "one view"].set_index("seed")
    assert list(one_view["difference"]) == [0, 0, 0, 0]  # one view, both seeds are the baseline's predictions
    # Holm: the two pooled rows are one family of 2 claims, the rows over seeds another, in which one view's
    # (no spread, no test) is not counted; the per-seed rows of a pooled comparison are not claims
    assert one_view.loc["pooled (2)", "p_value"] == 1
    assert served.loc["pooled (2)", "p_holm"] == pytest.approx(min(1, 2 * served.loc["pooled (2)", "p_value"]))
    assert one_view.loc["pooled (2)", "p_holm"] == 1
    assert over_seeds["p_holm"] == pytest.approx(0.5) and np.isnan(one_view.loc["over seeds (2)", "p_holm"])
    assert compared[compared["seed"].isin(["1", "2"])]["p_holm"].isna().all()
    assert list(compared.columns).index("p_holm") == list(compared.columns).index("p_value") + 1
    assert set(compared["configuration"]) == {"a"}
    assert set(compared["baseline"]) == {"a, logistic regression"}

    # the test-time views' gain over the run's own one view: 0.85 - 0.80 for each seed; none without one view
    assert list(table.set_index("run_id").loc[[runs[1], runs[2], other], "test/tta_gain"].round(6).fillna(-1)) == [0.05, 0.05, -1]
    summary = report.summarize_configurations(table).set_index(["backbone", "head"])
    assert summary.loc[("a", "dense"), "test/tta_gain_mean"] == pytest.approx(0.05)

    files = report.write_report(client, "techniques", tmp_path / "results", baseline=declared)
    assert {"comparisons.csv", "comparisons.md"} <= set(files)
    # the summary again from the committed runs.csv alone, without the store: the same figures
    assert report.write_summary(tmp_path / "results" / "runs.csv", tmp_path / "again") == ["summary.csv", "summary.md"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "summary.csv"),
                                  pd.read_csv(tmp_path / "results" / "summary.csv"))
    with pytest.raises(UserError, match="does not exist; give the runs.csv of an earlier report"):
        report.write_summary(tmp_path / "missing.csv", tmp_path / "again")
    # the comparisons again from the committed comparisons.csv, without the over-seeds rows: the same rows back
    written = pd.read_csv(tmp_path / "results" / "comparisons.csv", dtype={"seed": str})
    written[~written["seed"].str.startswith("over seeds")].to_csv(tmp_path / "older.csv", index=False)
    assert report.write_comparisons(tmp_path / "older.csv", tmp_path / "again") == ["comparisons.csv",
                                                                                   "comparisons.md"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "comparisons.csv"),
                                  pd.read_csv(tmp_path / "results" / "comparisons.csv"))
    with pytest.raises(UserError, match="does not exist; give the comparisons.csv of an earlier report"):
        report.write_comparisons(tmp_path / "missing.csv", tmp_path / "again")
    assert "+10.00" in (tmp_path / "results" / "comparisons.md").read_text()

    log_predictions(client, other, tmp_path, first_90, version="v2")  # retagged: evaluated on other images
    client.log_param(baseline, "backbone.name", "a")
    with pytest.raises(UserError, match="no finished run matches the declared baseline"):
        report.comparisons(report.experiment_runs(client, "techniques"), table,
                           OmegaConf.create({"where": {"model.head": "svm"}}))


def test_configurations_whose_labels_read_alike_are_compared_apart(tracking_uri, tmp_path):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("pairs", artifact_location=str(tmp_path / "artifacts"))
    baseline = log_run(client, experiment_id, "a", 0.01, 1, 0.80, 0.80)
    client.log_param(baseline, "model.head", "logistic_regression")
    log_predictions(client, baseline, tmp_path, np.arange(100) < 80)
    for backbones, right in (("a+b", 90), ("a+c", 70)):  # both "2 backbones"
        for seed in (1, 2):
            run_id = log_run(client, experiment_id, backbones, 0.01, seed, 0.85, right / 100)
            client.log_param(run_id, "model.head", "dense")
            log_predictions(client, run_id, tmp_path, np.arange(100) < right)
    runs = report.experiment_runs(client, "pairs")
    compared = report.comparisons(runs, selection.runs_table(runs),
                                  OmegaConf.create({"where": {"model.head": "logistic_regression"}}))
    pooled = compared[compared["seed"] == "pooled (2)"].set_index("configuration")["difference"]
    assert pooled.to_dict() == pytest.approx({"2 backbones, backbone=a+b": 0.10, "2 backbones, backbone=a+c": -0.10})
    assert compared["seed"].tolist().count("over seeds (2)") == 2


def test_unknown_or_empty_experiment_is_a_one_line_error(store):
    client, _, _ = store
    with pytest.raises(UserError, match=r"no MLflow experiment 'nope' .*experiments there: Default, grid$"):
        report.experiment_runs(client, "nope")
    client.create_experiment("empty")
    with pytest.raises(UserError, match="'empty' has no training runs yet; run it first"):
        report.experiment_runs(client, "empty")


def test_report_writes_tables_and_figures_replaces_old_results_and_logs_a_report_run(store, tmp_path):
    client, ids, _ = store
    out = tmp_path / "results"
    out.mkdir()
    (out / "stale.png").write_bytes(b"from an earlier report")
    files = report.write_report(client, "grid", out)
    assert files == sorted(p.name for p in out.iterdir())
    assert set(files) == {"runs.csv", "runs.md", "summary.csv", "summary.md", "validation_curves.png",
                          "accuracy_by_backbone.png", "accuracy_vs_lr.png", "best_run_confusions.png",
                          "best_run_mistakes.jpg"}
    runs = pd.read_csv(out / "runs.csv")
    assert runs["run_id"].tolist()[0] == ids["b", 0.01, 2] and len(runs) == 7
    [seeds_row] = [line for line in (out / "summary.md").read_text().splitlines() if "0.8200 ± 0.0200" in line]
    assert seeds_row.split("|")[1].strip() == "a" and "|   3 |" in seeds_row and "0.7900 ± 0.0100" in seeds_row
    for figure in [*out.glob("*.png"), *out.glob("*.jpg")]:
        assert Image.open(figure).size[0] > 500
    [report_run] = client.search_runs([client.get_experiment_by_name("grid").experiment_id], "tags.report = 'true'")
    assert report_run.data.tags["report.best_run_id"] == ids["b", 0.01, 2]
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert logged == {f"report/{name}" for name in files}
    # a second report leaves the first report run out of its table
    report.write_report(client, "grid", out)
    assert len(pd.read_csv(out / "runs.csv")) == 7


def test_with_runs_selected_on_different_metrics_the_sweep_names_no_best_job_and_the_report_says_so(store, tmp_path,
                                                                                                 caplog):
    client, ids, sweep = store
    for key, run_id in ids.items():
        if key != "failed":
            client.set_tag(run_id, "selection.metric", "cv/accuracy" if key == ("a", 0.1, 1) else "val/accuracy_best")
    summarize(sweep)
    assert "best_run_id" not in client.get_run(sweep).data.tags
    summary_md = mlflow.artifacts.download_artifacts(run_id=sweep, artifact_path="summary.md", dst_path=str(tmp_path))
    assert open(summary_md).read().startswith("The jobs were selected on different metrics")
    assert "(val/accuracy_best: 5 runs, cv/accuracy: 1 run)" in caplog.text
    report.write_report(client, "grid", tmp_path / "results")
    assert (tmp_path / "results" / "runs.md").read_text().startswith("The runs were selected on different metrics")
    client.set_tag(ids["a", 0.1, 1], "selection.metric", "val/accuracy_best")
    summarize(sweep)
    assert client.get_run(sweep).data.tags["best_run_id"] == ids["b", 0.01, 2]
    report.write_report(client, "grid", tmp_path / "results")
    assert not (tmp_path / "results" / "runs.md").read_text().startswith("The runs were")


def test_report_marks_the_pareto_fronts_of_the_runs_that_logged_their_serving_cost(tracking_uri, tmp_path):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("costs", artifact_location=str(tmp_path / "artifacts"))
    runs = {name: log_run(client, experiment_id, name, 0.01, 1, val, val - 0.02, cost=cost) for name, val, cost in (
        ("accurate", 0.90, {LATENCY: 50.0, SIZE: 40.0, PASSES: 4}),
        ("fast", 0.85, {LATENCY: 20.0, SIZE: 40.0, PASSES: 1}),  # as large as accurate, and less accurate
        ("small", 0.80, {LATENCY: 30.0, SIZE: 10.0, PASSES: 1}),  # slower than fast, and less accurate
        ("neither", 0.84, {LATENCY: 25.0, SIZE: 45.0, PASSES: 2}),  # beaten by fast on both
        ("old", 0.95, {}))}  # logged before its latency was measured: left out
    files = report.write_report(client, "costs", tmp_path / "results")
    assert {"pareto.csv", "pareto.png"} <= set(files)
    costs = pd.read_csv(tmp_path / "results" / "pareto.csv").set_index("run_id")
    assert list(costs.index) == [runs[name] for name in ("accurate", "fast", "neither", "small")]  # best first
    assert set(costs.index[costs["pareto_latency"]]) == {runs["accurate"], runs["fast"]}
    assert set(costs.index[costs["pareto_size"]]) == {runs["accurate"], runs["small"]}
    assert list(costs[PASSES]) == [4, 1, 2, 1]
    assert list(costs["test/accuracy"]) == pytest.approx([0.88, 0.83, 0.82, 0.78])


def test_report_tables_each_shift_per_configuration_averaged_over_severities_and_seeds(tracking_uri, tmp_path):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("shifts", artifact_location=str(tmp_path / "artifacts"))

    def measured(blur_test):  # every condition 0.6 on validation; on test 0.7 but for blur
        conditions = {f"shifted/{split}/{c.replace(':', '_')}": 0.6 if split == "val" else 0.7
                      for split in ("val", "test") for c in shifts.CONDITIONS}
        return conditions | {f"shifted/test/blur_{s}": blur_test + (s - 2) * 0.1 for s in shifts.SEVERITIES}

    for seed, blur in ((1, 0.3), (2, 0.5)):
        log_run(client, experiment_id, "robust", 0.01, seed, 0.9, 0.85, cost=measured(blur))
    log_run(client, experiment_id, "plain", 0.01, 1, 0.8, 0.8)  # measured no shift: not in the table
    files = report.write_report(client, "shifts", tmp_path / "results")
    assert {"shifts.csv", "shifts.md"} <= set(files)
    table = pd.read_csv(tmp_path / "results" / "shifts.csv").set_index("split")
    assert list(table["backbone"]) == ["robust", "robust"] and list(table["n"]) == [2, 2]
    assert table.loc["shifted test", "blur"] == pytest.approx(0.4)  # severities 0.2/0.3/0.4 and 0.4/0.5/0.6
    assert table.loc["shifted test", "rotation"] == pytest.approx(0.7)
    assert table.loc["shifted test", "mean"] == pytest.approx((7 * 0.7 + 0.4) / 8)
    assert table.loc["shifted val", "mean"] == pytest.approx(0.6)


def test_report_draws_the_optuna_study_of_the_experiments_sweep(store, tmp_path):
    client, _, sweep = store
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for lr, dropout in ((0.01, 0.1), (0.1, 0.5), (0.03, 0.3)):
        study.enqueue_trial({"lr": lr, "model.dropout": dropout})
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1, log=True) - t.suggest_float("model.dropout", 0, 1) / 10,
                   n_trials=3)
    client.set_tag(sweep, "optuna.study", "s")
    client.set_tag(sweep, "optuna.storage", storage)
    files = report.write_report(client, "grid", tmp_path / "results")
    assert {"optuna_optimization_history.png", "optuna_param_importances.png"} <= set(files)


def test_a_study_kept_in_memory_leaves_out_the_optuna_figures_and_a_missing_one_is_an_error(store, tmp_path):
    client, _, sweep = store
    client.set_tag(sweep, "optuna.study", "s")  # no optuna.storage: the study was in memory
    files = report.write_report(client, "grid", tmp_path / "results")
    assert not [f for f in files if f.startswith("optuna")] and "runs.csv" in files
    missing = tmp_path / "nowhere" / "optuna.db"
    with pytest.raises(UserError, match=f"sqlite:///{missing} does not exist here; pass its storage with"):
        report.write_report(client, "grid", tmp_path / "results", optuna_storage=f"sqlite:///{missing}")
    assert not missing.parent.exists()  # looking for it created nothing


def test_log_study_tags_the_storage_without_its_password(tracking_uri, monkeypatch):
    from src import search
    from src.track import SWEEP_RUN_ENV

    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    monkeypatch.setenv(SWEEP_RUN_ENV, run_id)
    study = optuna.create_study(study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 0, 1) + t.suggest_float("dropout", 0, 1), n_trials=3)
    search.log_study(study, "postgresql://user:secret@db:5432/optuna")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["optuna.storage"] == "postgresql://user:***@db:5432/optuna"
    assert run.data.tags["optuna.study"] == "s" and run.data.tags["optuna.best_trial"] == str(study.best_trial.number)


def test_data_that_changed_since_the_run_stops_the_report_and_leaves_folder_and_store_as_they_were(store, tmp_path):
    client, ids, _ = store
    best = ids["b", 0.01, 2]
    changed = pd.DataFrame({"label": np.repeat([3, 2, 1, 0], 20), "predicted": np.zeros(80, dtype=int),
                            "confidence": 0.9}).rename_axis("index")
    changed.to_csv(tmp_path / "test_predictions.csv")
    client.log_artifact(best, str(tmp_path / "test_predictions.csv"))  # labels that the synthetic data does not have
    out = tmp_path / "results"
    out.mkdir()
    (out / "kept.csv").write_text("an earlier report\n")
    with pytest.raises(UserError, match=r"test image \d+ of synthetic has label \d, but run .* logged \d: the data "
                                        "changed since the run"):
        report.write_report(client, "grid", out)
    assert [p.name for p in tmp_path.joinpath("results").parent.iterdir() if p.name.startswith((".results", "results"))] \
        == ["results"] and [p.name for p in out.iterdir()] == ["kept.csv"]
    assert not client.search_runs([client.get_experiment_by_name("grid").experiment_id], "tags.report = 'true'")


def test_a_storage_logged_without_its_password_stops_the_report_before_anything_is_written(store, tmp_path):
    client, _, sweep = store
    client.set_tag(sweep, "optuna.study", "s")
    client.set_tag(sweep, "optuna.storage", "postgresql://user:***@db/optuna")
    out = tmp_path / "results"
    out.mkdir()
    (out / "kept.csv").write_text("an earlier report\n")
    with pytest.raises(UserError, match="without its password; pass its storage with --optuna-storage URL"):
        report.write_report(client, "grid", out)
    assert [p.name for p in out.iterdir()] == ["kept.csv"]
    assert not client.search_runs([client.get_experiment_by_name("grid").experiment_id], "tags.report = 'true'")


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_each_experiment_config_names_its_mlflow_experiment_and_has_a_readme(name):
    cfg = compose_config(f"experiment={name}")
    assert cfg.tracking.experiment_name == name
    assert (PROJECT_ROOT / "experiments" / name / "README.md").is_file()


def test_an_experiment_sweep_then_make_report(tmp_path, tiny_backbone):
    """`python train.py -m experiment=lr_batch_grid` (its grid cut to 2 x 1 on the command line, which
    replaces the config's sweep values key by key; synthetic data), then
    `make report EXPERIMENT=lr_batch_grid` into a temporary folder."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2"}
    sweep = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=lr_batch_grid", "data=synthetic", "backbone.name=tiny",
         f"backbone.handle={tiny_backbone}", "epochs=2", "trainer.verbose=0", "lr=0.01,0.1",
         "batch_size=32", f"tracking.artifact_location={tmp_path}/art",
         f"paths.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/multirun/{uuid.uuid4().hex[:8]}"],
        cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    out = tmp_path / "results"
    made = subprocess.run(["make", "--no-print-directory", "report", "EXPERIMENT=lr_batch_grid", f"ARGS=--out {out}"],
                          cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert f"report of 'lr_batch_grid' in {out}" in made.stdout
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["lr"]) == [0.01, 0.1] and set(runs["status"]) == {"FINISHED"}
    assert (runs["model/size_mb"] > 0).all() and runs["test/accuracy"].between(0, 1).all()
    files = {p.name for p in out.iterdir()}
    assert {"accuracy_vs_lr.png", "accuracy_by_backbone.png", "validation_curves.png"} <= files
    # the best run's confusion and mistake figures exist when it made a mistake
    assert ({"best_run_confusions.png", "best_run_mistakes.jpg"} <= files) == (runs["test/accuracy"].iloc[0] < 1)


def test_make_report_without_an_experiment_or_with_an_unknown_one_says_what_to_do(tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    missing = subprocess.run(["make", "--no-print-directory", "report"], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "error: say which experiment: make report EXPERIMENT=<name>" in missing.stderr
    unknown = subprocess.run([sys.executable, "scripts/report.py", "nope"], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: no MLflow experiment 'nope'")


def test_rows_over_seeds_keep_every_comparison_a_configuration_label_may_be_empty():
    """A configuration that differs from its baseline in no shown column has an empty label (NaN in a CSV)."""
    rows = [{"configuration": np.nan, "baseline": "refit", "view": "as served", "seed": str(seed),
             "baseline_seed": str(seed), "n": 100, "accuracy_a": 0.8, "accuracy_b": 0.8 + d, "difference": d,
             "ci_low": d - 0.05, "ci_high": d + 0.05, "p_value": 0.5, "test": "McNemar exact"}
            for seed, d in ((1, 0.02), (2, 0.04))]
    compared = report.with_seed_rows(pd.DataFrame(rows))
    assert list(compared["seed"]) == ["1", "2", "over seeds (2)"] and compared["configuration"].isna().all()
    assert compared["difference"].iloc[-1] == pytest.approx(0.03)
    assert report.with_seed_rows(compared).equals(compared)  # made again, not added twice
    adjusted = report.with_holm(compared)
    assert report.with_holm(adjusted).equals(adjusted)
    single = report.with_holm(pd.DataFrame(rows[:1]))  # one seed: its only row is the comparison's claim
    assert single["p_holm"].tolist() == [0.5]


def test_holm_counts_a_single_seed_comparison_with_the_pooled_rows_and_the_rows_over_seeds_apart():
    def row(configuration, seed, p):
        return {"configuration": configuration, "baseline": "base", "view": "as served", "seed": seed,
                "baseline_seed": seed, "n": 100, "accuracy_a": 0.8, "accuracy_b": 0.82, "difference": 0.02,
                "ci_low": 0.0, "ci_high": 0.04, "p_value": p, "test": "test"}
    compared = report.with_holm(pd.DataFrame(
        [row("a", "1", 0.01), row("a", "2", 0.2), row("a", "pooled (2)", 0.02), row("a", "over seeds (2)", 0.3),
         row("b", "1", 0.03)]))
    # over the images: a's pooled row and b's only row, {0.02, 0.03} -> 0.04 and max(0.03, 0.04); over seeds: a's
    assert compared["p_holm"].tolist()[2:] == pytest.approx([0.04, 0.3, 0.04])
    assert compared["p_holm"].iloc[:2].isna().all()
    table = report._comparisons_markdown(compared.assign(run_id="", baseline_run_id="")).splitlines()[-5:]
    assert [line.split("|")[-2].strip() for line in table] == ["", "", "0.04", "0.3", "0.04"]
