"""Reports: an MLflow experiment's runs -> tables, per-configuration summaries with intervals, paired comparisons
with the experiment's baseline, and figures; written to a folder (experiments/<name>/results) and logged to a
`report` run of the same experiment.

The best run is the first finished run in the selection order (src/selection.py). Its test confusions and
mistakes are drawn, never used to choose. The baseline is declared in the experiment's config
(conf/experiment/<name>.yaml, `report.baseline`): `where` names the params of its runs, `same` the columns that a
configuration shares with the baseline it is compared with (e.g. its backbones).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from src import compare, files, plots, progress, search, selection, shifts, stats
from src.config import CONF_DIR, UserError
from src.selection import LATENCY, LOSS, PASSES, SCORE, SIZE, configuration_columns, finished, markdown
from src.track import run_config

log = logging.getLogger(__name__)

ACCURACIES = [SCORE, "val/accuracy_best", "val/accuracy_tta", "cv/accuracy", "test/accuracy",
              "test/accuracy_single_view", "test/tta_gain", "test/mean_class_accuracy", "test/top5_accuracy",
              "shifted/val/accuracy", "shifted/test/accuracy"]
PROVENANCE = ["git_commit", "dataset_version", "tensorflow", "keras", "mlflow"]
MISTAKES = 12


def experiment_runs(client: mlflow.MlflowClient, experiment_name: str) -> pd.DataFrame:
    """The experiment's training runs (not its sweep, report or evaluation runs), as `mlflow.search_runs` gives them."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"no MLflow experiment '{experiment_name}' in {mlflow.get_tracking_uri()}; run it first "
                        f"(python train.py -m experiment={experiment_name}); experiments there: {known}")
    runs = mlflow.search_runs([experiment.experiment_id])
    for tag in ("tags.sweep", "tags.report", "tags.evaluation"):
        if tag in runs:
            runs = runs[runs[tag] != "true"]
    if runs.empty:
        raise UserError(f"experiment '{experiment_name}' has no training runs yet; "
                        f"run it first (python train.py -m experiment={experiment_name})")
    return runs


def summarize_configurations(table: pd.DataFrame) -> pd.DataFrame:
    """Finished runs grouped by configuration (everything but the seed): n runs, their distinct seeds, the mean and
    std of each accuracy and of the selection loss, a t-based 95 % interval on each mean when n >= 3, and where
    the runs come from. Best first, as runs are ranked, on the means."""
    done = finished(table)
    keys = _configuration_keys(table)
    grouped = done.groupby(keys, dropna=False, sort=False)
    summary = grouped[[*ACCURACIES, LOSS]].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    for metric in ACCURACIES:
        bounds = grouped[metric].agg(lambda v: stats.t_interval(v.dropna())[1:] if v.notna().sum() >= 3 else (np.nan,) * 2)
        summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"] = zip(*bounds) if len(bounds) else ((), ())
    summary.insert(0, "seeds", grouped["seed"].nunique())
    summary.insert(0, "n", grouped.size())
    for column in PROVENANCE:
        summary[column] = grouped[column].agg(lambda v: " ".join(sorted(v.dropna().astype(str).unique())))
    return summary.reset_index().sort_values([f"{SCORE}_mean", f"{LOSS}_mean"], ascending=[False, True],
                                             ignore_index=True)


def write_summary(runs_csv: Path, out_dir: Path) -> list[str]:
    """summary.csv and summary.md again from a committed runs.csv, without the MLflow store (which keeps what
    the comparisons and figures need); the folder's other files are left as they are. Returns the file names."""
    if not runs_csv.is_file():
        raise UserError(f"{runs_csv} does not exist; give the runs.csv of an earlier report")
    table = selection.with_tta_gain(pd.read_csv(runs_csv))
    summary = summarize_configurations(table)
    with files.replaced(out_dir / "summary.csv") as staging:
        summary.to_csv(staging, index=False)
    with files.replaced(out_dir / "summary.md") as staging:
        staging.write_text(markdown(_readable(summary), configuration_columns(table)))
    return ["summary.csv", "summary.md"]


def _configuration_keys(table: pd.DataFrame) -> list[str]:
    """The configuration columns that some finished run fills: what groups runs into configurations."""
    done = finished(table)
    return [c for c in configuration_columns(table) if done[c].notna().any()]


def by_shift(runs: pd.DataFrame, table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and split (shifted validation, shifted test), the accuracy under each shift (the mean over
    its severities, then over the seeds) and their mean; empty when no run measured shifts (robustness.measure).
    Best first, in the order of `summary` (`summarize_configurations`)."""
    done = finished(table)
    keys = _configuration_keys(table)
    metrics = runs.set_index("run_id").reindex(done["run_id"])
    rows = []
    for split in ("val", "test"):
        columns = {shift: [f"metrics.shifted/{split}/{shift}_{severity}" for severity in shifts.SEVERITIES]
                   for shift in shifts.SHIFTS}
        if not all(c in metrics for names in columns.values() for c in names):
            continue
        per_run = pd.DataFrame({shift: metrics[names].mean(axis=1).to_numpy() for shift, names in columns.items()})
        per_run = per_run.assign(**{k: done[k].to_numpy() for k in keys}).dropna(subset=list(columns))
        per_run["mean"] = per_run[list(columns)].mean(axis=1)
        grouped = per_run.groupby(keys, dropna=False, sort=False)
        rows.append(grouped[[*columns, "mean"]].mean().assign(split=f"shifted {split}", n=grouped.size()))
    if not rows:
        return pd.DataFrame()
    order = {tuple(r): i for i, r in enumerate(summary[keys].itertuples(index=False))}
    result = pd.concat(rows).reset_index()
    result["rank"] = [order.get(tuple(r), len(order)) for r in result[keys].itertuples(index=False)]
    return result.sort_values(["split", "rank"], ignore_index=True).drop(columns="rank")


def by_backbone(summary: pd.DataFrame) -> pd.DataFrame:
    """Per backbone, its configuration with the best mean score, from `summarize_configurations`."""
    return summary.drop_duplicates("backbone").sort_values("backbone", ignore_index=True)


def pareto(table: pd.DataFrame) -> pd.DataFrame:
    """The finished runs that logged their serving cost, best first, with `pareto_latency` and `pareto_size`: whether
    a run is on the Pareto front of the selection score against that cost, i.e. no other run is at least as good
    on both and better on one. The front is chosen on the score, as register-best chooses, never on test."""
    runs = finished(table).dropna(subset=[LATENCY, SIZE])
    runs = runs[["run", SCORE, "val/accuracy_best", "test/accuracy", LATENCY, PASSES, SIZE, "run_id"]]
    score = runs[SCORE]
    front = {column: [not ((score >= s) & (cost <= c) & ((score > s) | (cost < c))).any() for s, c in zip(score, cost)]
             for column, cost in (("pareto_latency", runs[LATENCY]), ("pareto_size", runs[SIZE]))}
    return runs.assign(**front)


def baseline_declaration(experiment_name: str) -> DictConfig | None:
    """`report.baseline` of conf/experiment/<name>.yaml, if the experiment has a config that declares one."""
    path = CONF_DIR / "experiment" / f"{experiment_name}.yaml"
    return OmegaConf.select(OmegaConf.load(path), "report.baseline") if path.is_file() else None


def declared_baseline(where: list[str], same: list[str]) -> DictConfig:
    """A baseline declaration from the command line: `where` as PARAM=VALUE strings, `same` as column names."""
    if not all("=" in item for item in where):
        raise UserError(f"--baseline {' '.join(where)} is invalid: expected PARAM=VALUE pairs, "
                        "e.g. --baseline model.head=logistic_regression")
    return OmegaConf.create({"where": dict(item.split("=", 1) for item in where), "same": list(same)})


def comparisons(runs: pd.DataFrame, table: pd.DataFrame, baseline: DictConfig) -> pd.DataFrame:
    """Each configuration's finished runs against the baseline's runs that share its `baseline.same` columns, on the
    same test images: per seed (with the baseline run of the same seed, or its only one) and pooled over seeds;
    as served, and with one view where the configuration averages several. B is the configuration, A the
    baseline."""
    done = finished(table)
    where = pd.Series(True, index=runs.index)
    for key, value in baseline.where.items():
        where &= runs.get(f"params.{key}", pd.Series(index=runs.index, dtype=object)).astype(str) == str(value)
    is_baseline = done["run_id"].isin(runs.loc[where, "run_id"])
    if not is_baseline.any():
        raise UserError(f"no finished run matches the declared baseline {OmegaConf.to_container(baseline.where)}; "
                        "run it, or fix report.baseline in the experiment's config")
    keys = [c for c in configuration_columns(table) if done[c].notna().any()]
    varying = [c for c in keys if done[c].nunique(dropna=False) > 1]
    predictions = {run_id: compare.load_predictions(run_id)
                   for run_id in progress.each(list(done["run_id"]), "per-image predictions", "run")}
    rows = []
    groups = [group for _, group in done[~is_baseline].groupby(keys, dropna=False, sort=False)]
    labels = _distinct_labels([group.iloc[0] for group in groups], varying)
    for group, label in zip(groups, labels):
        first = group.iloc[0]
        base = done[is_baseline]
        for column in baseline.get("same", []):
            if column not in done:
                raise UserError(f"report.baseline.same names {column!r}, which is not a configuration column of "
                                f"the runs; use some of: {', '.join(keys)}")
            base = base[base[column].astype(str) == str(first[column])]
        if base.empty:
            continue
        base_label = _row_label(base.iloc[0], varying)
        one_view = "predicted_single_view" in predictions[first["run_id"]].frame
        for view in ("as served", "one view") if one_view else ("as served",):
            rows += _compare_group(group, base, predictions, view == "one view",
                                   {"configuration": label, "baseline": base_label, "view": view})
    return with_holm(with_seed_rows(pd.DataFrame(rows)))


def with_seed_rows(compared: pd.DataFrame) -> pd.DataFrame:
    """`compared` (comparisons.csv's rows) with, after each comparison's per-seed and pooled rows, one row over
    the seeds (stats.seed_comparison) when it has several; over-seeds rows already there are made again."""
    if compared.empty:
        return compared
    compared = compared[~compared["seed"].astype(str).str.startswith("over seeds")]
    parts = []
    for keys, group in compared.groupby(["configuration", "baseline", "view"], sort=False, dropna=False):
        parts.append(group)
        per_seed = group[~group["seed"].astype(str).str.startswith("pooled")]
        if len(per_seed) > 1:
            paired = stats.seed_comparison([stats.Paired(**{f.name: row[f.name] for f in fields(stats.Paired)})
                                            for _, row in per_seed.iterrows()])
            parts.append(pd.DataFrame([{**dict(zip(("configuration", "baseline", "view"), keys)),
                                        "seed": f"over seeds ({len(per_seed)})", "baseline_seed": "per seed",
                                        **paired.as_dict()}]))
    return pd.concat(parts, ignore_index=True)


def with_holm(compared: pd.DataFrame) -> pd.DataFrame:
    """`compared` with `p_holm` after `p_value`: each claim's p-value adjusted by Holm's method (stats.holm) within
    its family. The claims over the images are the pooled rows and a comparison's only row when it has one seed;
    the rows over seeds are a second family. A per-seed row of a comparison with several seeds is a part of its
    pooled row, not a claim of its own, and gets none."""
    if compared.empty:
        return compared
    compared = compared.drop(columns="p_holm", errors="ignore")
    seed = compared["seed"].astype(str)
    comparison = compared.groupby(["configuration", "baseline", "view"], sort=False, dropna=False).ngroup()
    over_seeds = seed.str.startswith("over seeds")
    over_images = seed.str.startswith("pooled") | (comparison.map(comparison.value_counts()) == 1)
    p_holm = pd.Series(np.nan, index=compared.index)
    for family in (over_images, over_seeds):
        p_holm[family] = stats.holm(compared.loc[family, "p_value"])
    compared.insert(compared.columns.get_loc("p_value") + 1, "p_holm", p_holm)
    return compared


def write_comparisons(comparisons_csv: Path, out_dir: Path) -> list[str]:
    """comparisons.csv and comparisons.md again from an earlier report's comparisons.csv, with the rows over
    seeds and the adjusted p-values, without the MLflow store; the folder's other files are left as they are.
    Returns the file names."""
    if not comparisons_csv.is_file():
        raise UserError(f"{comparisons_csv} does not exist; give the comparisons.csv of an earlier report")
    labels = ("configuration", "baseline", "seed", "baseline_seed")
    compared = pd.read_csv(comparisons_csv, dtype=dict.fromkeys(labels, str))
    compared = compared.fillna(dict.fromkeys(labels, ""))  # empty labels, as a report has them
    compared = with_holm(with_seed_rows(compared))
    with files.replaced(out_dir / "comparisons.csv") as staging:
        compared.to_csv(staging, index=False)
    with files.replaced(out_dir / "comparisons.md") as staging:
        staging.write_text(_comparisons_markdown(compared))
    return ["comparisons.csv", "comparisons.md"]


def _compare_group(group: pd.DataFrame, base: pd.DataFrame, predictions: dict, one_view: bool,
                   labels: dict) -> list[dict]:
    rows = []
    for _, run in group.iterrows():
        same_seed = base[base["seed"] == run["seed"]]
        other = (same_seed if len(same_seed) else base).iloc[0]
        a, b = predictions[other["run_id"]], predictions[run["run_id"]]
        compare.check_same_images(a, b)
        paired = stats.paired_comparison(a.correct(), b.correct(one_view))
        rows.append({**labels, "seed": str(run["seed"]), "baseline_seed": str(other["seed"]), **paired.as_dict(),
                     "run_id": run["run_id"], "baseline_run_id": other["run_id"]})
    if len(group) > 1:
        a = np.stack([predictions[r].correct() for r in base["run_id"]])
        b = np.stack([predictions[r].correct(one_view) for r in group["run_id"]])
        paired = stats.pooled_comparison(a, b)
        rows.append({**labels, "seed": f"pooled ({len(group)})", "baseline_seed": f"pooled ({len(base)})",
                     **paired.as_dict()})
    return rows


def _row_label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(_configuration_label(row, keys).splitlines())


def _distinct_labels(rows: list[pd.Series], keys: list[str]) -> list[str]:
    """Each configuration's row label; where two configurations read alike (`2 backbones` for a+b and a+c),
    each is followed by the columns in which they differ, so that their comparisons stay apart."""
    labels = [_row_label(row, keys) for row in rows]
    for label in {label for label in labels if labels.count(label) > 1}:
        alike = [row for row, other in zip(rows, labels) if other == label]
        differ = [key for key in keys if len({str(row[key]) for row in alike}) > 1]
        labels = [other if other != label else
                  ", ".join(filter(None, [label, *(f"{key}={row[key]}" for key in differ)]))
                  for row, other in zip(rows, labels)]
    return labels


def write_report(client: mlflow.MlflowClient, experiment_name: str, out_dir: Path,
                 optuna_storage: str | None = None, baseline: DictConfig | None = None) -> list[str]:
    """Write the report's files into `out_dir`, replacing what a previous report left there, and log them to a
    new `report` run of the experiment. If a part fails, the folder and the store are left as they were.
    `baseline`: the declaration the comparisons follow; by default the experiment config's. Returns the file
    names."""
    runs = experiment_runs(client, experiment_name)
    table = selection.runs_table(runs)
    done = finished(table)
    if done.empty:
        raise UserError(f"experiment '{experiment_name}' has no finished run with {SCORE}; "
                        "see runs.csv's status and error columns in the MLflow UI (make ui)")
    best = client.get_run(done.iloc[0]["run_id"])
    mixed = selection.mixed_metrics(done["selection_metric"])
    mixed_note = (f"The runs were selected on different metrics ({mixed}), whose scores do not compare; the order "
                  "of runs.csv, the best run's figures and the Pareto fronts mix them.") if mixed else ""
    if mixed:
        log.warning(mixed_note)
    summary = summarize_configurations(table)
    baseline = baseline if baseline is not None else baseline_declaration(experiment_name)
    compared = comparisons(runs, table, baseline) if baseline is not None else None
    costs = pareto(table)
    shifted = by_shift(runs, table, summary)
    figures = _figures(client, experiment_name, table, summary, best, optuna_storage, costs)
    try:
        with files.replaced(out_dir, folder=True) as staging:
            configuration = configuration_columns(table)
            table.to_csv(staging / "runs.csv", index=False)
            (staging / "runs.md").write_text((mixed_note + "\n\n" if mixed else "")
                                             + markdown(table.drop(columns=["run_id"]), configuration))
            summary.to_csv(staging / "summary.csv", index=False)
            (staging / "summary.md").write_text(markdown(_readable(summary), configuration))
            if compared is not None:
                compared.to_csv(staging / "comparisons.csv", index=False)
                (staging / "comparisons.md").write_text(_comparisons_markdown(compared))
            if not costs.empty:
                costs.to_csv(staging / "pareto.csv", index=False)
            if not shifted.empty:
                shifted.to_csv(staging / "shifts.csv", index=False)
                (staging / "shifts.md").write_text(markdown(shifted, configuration))
            for name, figure in figures.items():
                figure.savefig(staging / name, dpi=110, pil_kwargs={"quality": 85} if name.endswith(".jpg") else None)
            _log_report_run(client, best, len(table), staging)
            names = sorted(p.name for p in staging.iterdir())
    finally:
        for figure in figures.values():
            plots.plt.close(figure)
    return names


def _figures(client, experiment_name: str, table: pd.DataFrame, summary: pd.DataFrame, best, optuna_storage,
             costs: pd.DataFrame) -> dict:
    done = finished(table)
    varying = [c for c in configuration_columns(table) if c in summary and summary[c].nunique(dropna=False) > 1]
    groups = {_label(done, run_id): _row_label(row, varying) or row["run"] for run_id, (_, row)
              in zip(done["run_id"], done.iterrows())}
    curves = _val_curves(client, done)
    figures = {}
    if curves:
        figures["validation_curves.png"] = plots.validation_curves(
            curves, {name: groups[name] for name in curves}, _label(done, best.info.run_id),
            f"{experiment_name}: val accuracy per epoch, one line per run")
    if "backbone" in summary:
        figures["accuracy_by_backbone.png"] = plots.accuracy_bars(
            by_backbone(summary), "backbone", f"{experiment_name}: accuracy per backbone (its best configuration)")
    if set(varying) - {"backbone", "lr", "batch_size"} and len(summary) <= 14:  # techniques, not a grid or search
        labels = summary.assign(configuration=[_configuration_label(row, varying) for _, row in summary.iterrows()])
        figures["accuracy_by_configuration.png"] = plots.accuracy_bars(
            labels, "configuration", f"{experiment_name}: accuracy per configuration")
    if "lr" in summary and summary["lr"].nunique() > 1:
        others = [c for c in configuration_columns(table) if c in summary and c not in ("backbone", "lr", "batch_size")]
        figures["accuracy_vs_lr.png"] = plots.accuracy_vs_lr(
            summary, f"{experiment_name}: accuracy against lr",
            connect=all(summary[c].nunique(dropna=False) <= 1 for c in others))
    if not costs.empty:
        figures["pareto.png"] = plots.accuracy_vs_cost(costs, f"{experiment_name}: accuracy against serving cost")
    study = _study(client, best.info.experiment_id, optuna_storage)
    if study is not None:
        figures |= {f"optuna_{name}": figure for name, figure in search.study_figures(study).items()}
    return figures | _best_run_figures(best)


# How a configuration column reads in labels: a word for a setting that is on, nothing for the default.
SHOWN = {"head": lambda v: "logistic regression" if v == "logistic_regression" else None,
         "augmentation": lambda v: "augmentation" if v == "True" else None,
         "model.tta": lambda v: None if v == "none" else f"TTA {v}",
         "model.train_views": lambda v: None if v == "none" else f"views {v}",
         "model.view_policy": lambda v: None if v in ("standard", "nan", "None") else f"{v} policy",
         "trainer.refit": lambda v: "refit" if v == "True" else None,
         "trainer.refit_budget": lambda v: "by steps" if v == "steps" else None,
         "trainer.cv_folds": lambda v: None if v in ("None", "nan") else f"{v}-fold CV",
         "trainer.select_on": lambda v: None if v == "clean" else f"select on {v}",
         "finetune.enabled": lambda v: "fine-tuned" if v == "True" else None,
         "model.augmentation.random_views": lambda v: "random-view augmentation" if v == "True" else None}


# Settings that only one kind of head reads, left out of the other's labels; the summary's columns keep them all.
LOGISTIC_REGRESSION_SETTINGS = ("model.c_grid", "model.max_iter", "model.tol")
HEAD_SETTINGS = {False: LOGISTIC_REGRESSION_SETTINGS,  # a Keras dense head
                 True: (*LOGISTIC_REGRESSION_SETTINGS, "dropout", "label_smoothing")}  # logistic regression


def _configuration_label(row: pd.Series, columns: list[str]) -> str:
    """One line per setting that is on, e.g. `4 backbones`, `TTA crops`, `refit`; fine-tuning's settings only
    where it is on; other columns as `name=value`."""
    lines = []
    for column in columns:
        value = str(row[column])
        if column.startswith("finetune.") and column != "finetune.enabled" and str(row.get("finetune.enabled")) != "True":
            continue
        if column == "backbone":
            lines.append(f"{value.count('+') + 1} backbones" if "+" in value else value)
        elif column in SHOWN:
            lines.append(SHOWN[column](value))
        elif column not in HEAD_SETTINGS[str(row.get("head")) == "logistic_regression"]:
            lines.append(f"{column.rsplit('.', 1)[-1]}={value}")
    return "\n".join(line for line in lines if line)


def _readable(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with each accuracy as "mean ± std [t interval]" (n >= 3), "mean ± std" (n = 2) or the mean (one
    run); empty when the runs do not log it."""
    readable = summary.drop(columns=[c for c in summary if c.endswith(("_mean", "_std", "_ci_low", "_ci_high"))])
    for metric in ACCURACIES:
        readable[metric] = [
            None if pd.isna(m) else f"{m:.4f}" if n == 1 else f"{m:.4f} ± {s:.4f}" if pd.isna(low)
            else f"{m:.4f} ± {s:.4f} [{low:.4f}, {high:.4f}]"
            for m, s, low, high, n in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"],
                                          summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"], summary["n"])]
    return readable.drop(columns=["seeds"]) if (summary["seeds"] == summary["n"]).all() else readable


def _comparisons_markdown(compared: pd.DataFrame) -> str:
    if compared.empty:
        return "No configuration shares the columns of the declared baseline.\n"
    shown = compared.drop(columns=["run_id", "baseline_run_id", "test"]).copy()
    for column in ("accuracy_a", "accuracy_b"):
        shown[column] = shown[column].map(lambda v: f"{v:.4f}")
    for column in ("difference", "ci_low", "ci_high"):
        shown[column] = (100 * shown[column]).map(lambda v: f"{v:+.2f}")
    shown["p_value"] = shown["p_value"].map(lambda p: f"{p:.2g}")
    shown["p_holm"] = shown["p_holm"].map(lambda p: "" if pd.isna(p) else f"{p:.3g}")  # 0.0501 is not 0.05
    note = ("Differences are B − A in points of test accuracy (B: the configuration, A: the baseline), with a 95 % "
            "paired-bootstrap interval over the test images. p: McNemar's exact test per seed; a sign-flip "
            "permutation test of the per-image differences for the pooled rows. The over-seeds rows take the "
            "per-seed differences as a sample of training runs: their mean, a Student's t interval and a "
            "one-sample t-test; they count how much training runs vary, which the pooled interval over images "
            "leaves out, and are wide with few seeds. p_holm: the p-value adjusted for the number of claims in "
            "this table (Holm), one family for the rows over images (pooled, or a comparison's only seed) and one "
            "for the rows over seeds, each family held to at most 5 % false claims; a per-seed row of a pooled "
            "comparison is not a claim of its own.\n\n")
    return note + shown.to_markdown(index=False, disable_numparse=True) + "\n"


def _log_report_run(client: mlflow.MlflowClient, best, runs: int, folder: Path) -> None:
    run = client.create_run(best.info.experiment_id, run_name="report",
                            tags={"report": "true", "report.best_run_id": best.info.run_id,
                                  "report.best_run_name": best.info.run_name})
    try:
        client.log_metric(run.info.run_id, "report/runs", runs)
        client.log_artifacts(run.info.run_id, str(folder), "report")
        client.set_terminated(run.info.run_id)
    except BaseException:
        client.delete_run(run.info.run_id)
        raise


def _label(runs: pd.DataFrame, run_id: str) -> str:
    """A run's name, with its id's start when another run of the table has the same name."""
    name = runs.loc[runs["run_id"] == run_id, "run"].iloc[0]
    return f"{name} ({run_id[:8]})" if (runs["run"] == name).sum() > 1 else name


def _val_curves(client: mlflow.MlflowClient, runs: pd.DataFrame) -> dict[str, pd.Series]:
    curves = {}
    for run_id in progress.each(list(runs["run_id"]), "validation curves", "run"):
        history = client.get_metric_history(run_id, "val/accuracy")
        if history:
            curves[_label(runs, run_id)] = pd.Series([m.value for m in history],
                                                     index=[m.step for m in history]).sort_index()
    return curves


def _study(client: mlflow.MlflowClient, experiment_id: str, storage: str | None) -> optuna.Study | None:
    """The Optuna study of the experiment's latest sweep that ran one (tags optuna.study, optuna.storage)."""
    sweeps = client.search_runs([experiment_id], "tags.sweep = 'true' and tags.`optuna.study` != ''",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        return None
    name, storage = sweeps[0].data.tags["optuna.study"], storage or sweeps[0].data.tags.get("optuna.storage")
    fix = "pass its storage with --optuna-storage URL"
    if storage is None:
        log.warning("study '%s' was kept in memory, so its Optuna figures cannot be drawn", name)
        return None
    if "***" in storage:
        raise UserError(f"the Optuna storage of study '{name}' was logged without its password; {fix}")
    shown = sqlalchemy.engine.make_url(storage).render_as_string()
    local = search.local_file(storage)
    if local is not None and not local.is_file():
        raise UserError(f"Optuna study '{name}': {shown} does not exist here; {fix}")
    try:
        return optuna.load_study(study_name=name, storage=search.make_storage(storage))
    except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"cannot load Optuna study '{name}' from {shown} ({reason}); {fix}") from None


def _best_run_figures(best) -> dict:
    """The best run's test confusions among its most-confused classes, and its most confident mistakes."""
    run_id, name = best.info.run_id, best.info.run_name
    try:
        confusion = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="test_confusion_matrix.csv"), index_col=0)
        predictions = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="test_predictions.csv"), index_col="index")
    except MlflowException:
        log.warning("best run %s (%s) has no test_confusion_matrix.csv or test_predictions.csv (a run from before "
                    "they were logged), so its confusion and mistake figures are left out", name, run_id)
        return {}
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    if wrong.empty:
        return {}
    accuracy = 1 - len(wrong) / len(predictions)
    class_names = list(confusion.columns)
    mistakes = wrong.nlargest(MISTAKES, "confidence")
    images = _test_images(run_id, mistakes)
    titles = [f"predicted: {class_names[p]} ({c:.0%})\ntrue: {class_names[t]}"
              for p, c, t in zip(mistakes["predicted"], mistakes["confidence"], mistakes["label"])]
    return {
        "best_run_confusions.png": plots.confused_classes(
            confusion, f"{name}: test confusions among the most-confused classes\n"
                       f"(counts; grey: right, on the diagonal; other classes left out; test accuracy {accuracy:.4f})"),
        "best_run_mistakes.jpg": plots.image_grid(  # photos: a JPEG is a tenth of the PNG
            images, titles, f"{name}: its {len(mistakes)} most confident test mistakes", colors=["red"] * len(images)),
    }


def _test_images(run_id: str, mistakes: pd.DataFrame) -> list[np.ndarray]:
    """The mistakes' test images, by their index in the split, from the data the run was trained on (its logged
    config). Each image's label must be the one the run logged for it: otherwise the data has changed."""
    import tensorflow as tf

    from src.data import load_splits

    config = run_config(run_id)
    wanted, images = dict(zip(mistakes.index, mistakes["label"])), {}
    for index, (image, label) in enumerate(load_splits(config.data).test):
        if index in wanted:
            if int(label) != wanted[index]:
                raise UserError(f"test image {index} of {config.data.name} has label {int(label)}, but run {run_id} "
                                f"logged {wanted[index]}: the data changed since the run; report on a new run")
            images[index] = tf.io.decode_image(image, channels=3, expand_animations=False).numpy()
            if len(images) == len(wanted):
                break
    if len(images) < len(wanted):
        raise UserError(f"the test split of {config.data.name} has fewer images than run {run_id} logged "
                        "predictions for: the data changed since the run; report on a new run")
    return [images[i] for i in mistakes.index]
