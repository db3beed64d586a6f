"""Optuna search: the study, its sampler, pruner and storage, the YAML search space, and per-epoch pruning.

The sweeper (hydra_plugins/flowers_optuna_sweeper) asks the study for a trial, launches the job with the
trial's values as overrides plus `+optuna_trial=<number>`, and tells the study the outcome. The job reports
its val accuracy after every epoch to the same storage, so the pruner can stop a poor trial early, even
when the job runs in another process or on another machine.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

import keras
import mlflow
import optuna
import psutil
import sqlalchemy
from omegaconf import DictConfig, OmegaConf

from src.config import UserError
from src.track import SWEEP_RUN_ENV, retry_on_race, store_lock

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING

log = logging.getLogger(__name__)


def local_file(url: str) -> Path | None:
    """The file behind a `sqlite:///` or `journal:///` storage URL; None for a database server's."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix))
    return None


def make_storage(url: str | None, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """`journal:///path/file.log` -> Optuna's journal file storage; any other URL -> SQLAlchemy (RDB) storage,
    with Optuna's heartbeats when `heartbeat_interval` (seconds) is set: a running trial whose worker has not
    beaten for `grace_period` seconds (default twice the interval) is failed by the next worker to look."""
    if url is None:
        return None
    path = local_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal://"):
        if heartbeat_interval is not None or grace_period is not None:
            raise UserError(f"hparams_search: heartbeats need an RDB storage (sqlite:/// or postgresql://), not {url}")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    with warnings.catch_warnings(), store_lock(url):  # the constructor creates a fresh database's tables
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                          heartbeat_stale_trial_callback=_stale_trial_failed)


def make_sampler(cfg: DictConfig, trial_number: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; a `seed` is offset by the trial number, so that each trial draws from its own
    stream: reproducible for one worker, yet distinct across parallel workers and re-runs of a study."""
    options = OmegaConf.to_container(cfg)
    if options.get("seed") is not None:
        options["seed"] += trial_number
    return _instance(optuna.samplers, options)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    return _instance(optuna.pruners, OmegaConf.to_container(cfg))


def _instance(module, options: dict):
    name = options.pop("name")
    return getattr(module, name)(**options)


def load_study(cfg: DictConfig) -> optuna.Study:
    """The study named in the sweeper config `cfg`, created on first use and resumed after that."""
    if not cfg.storage:
        raise UserError("hparams_search: set hydra.sweeper.storage, e.g. sqlite:///optuna.db; trials report to it")
    try:
        sampler, pruner = make_sampler(cfg.sampler), make_pruner(cfg.pruner)
        storage = make_storage(cfg.storage, cfg.heartbeat_interval, cfg.grace_period)
        return retry_on_race(lambda: optuna.create_study(
            study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner, direction=cfg.direction,
            load_if_exists=True))
    except (AttributeError, TypeError, ValueError) as error:
        raise UserError(f"hparams_search: cannot create study {cfg.study_name!r}: {error}") from None


def suggest(trial: optuna.Trial, space: DictConfig) -> dict:
    """Sample every parameter of the YAML space, e.g. `lr: {type: float, low: 1e-4, high: 1e-2, log: true}`.
    `type` is float, int or categorical (Optuna's suggest_float, suggest_int, suggest_categorical), or subset:
    `backbones: {type: subset, choices: [a, b, c]}` samples a non-empty list of the choices, one yes/no
    parameter per choice (`backbones.a`, ...), so that the sampler learns which members help. An empty draw
    prunes the trial before it runs."""
    values = {}
    for name, spec in space.items():
        options = OmegaConf.to_container(spec)
        kind = options.pop("type")
        if kind == "subset":
            chosen = [c for c in options["choices"] if trial.suggest_categorical(f"{name}.{c}", [True, False])]
            if not chosen:
                raise optuna.TrialPruned(f"{name}: the sampled subset is empty")
            values[name] = chosen
        elif kind in ("float", "int", "categorical"):
            values[name] = getattr(trial, f"suggest_{kind}")(name, **options)
        else:
            raise UserError(f"hparams_search: {name} has type {kind!r}; use float, int, categorical or subset")
    return values


def next_trial(study: optuna.Study, n_trials: int, sampler_cfg: DictConfig) -> optuna.Trial | None:
    """A new trial while fewer than `n_trials` are finished or running, counted across all workers.

    Two workers may ask at the same moment; the trial numbers decide which one runs. A trial asked beyond
    `n_trials` is told FAIL at once, with the reason as a user attribute, and never runs. The trial's values
    come from a sampler seeded for its number (see `make_sampler`)."""
    if len(counted_trials(study)) >= n_trials:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage")  # the sweeper beats, see `heartbeat`
        trial = study.ask()
    trial.set_user_attr("worker", _worker())
    trial.set_user_attr("worker_started", _started(os.getpid()))
    study.sampler = make_sampler(sampler_cfg, trial.number)
    if trial.number not in sorted(t.number for t in counted_trials(study))[:n_trials]:
        trial.set_user_attr("not_run", f"n_trials={n_trials} reached by other workers")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that `n_trials` counts: finished or running, in any worker."""
    return study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING))


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_abandoned_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a process of this host that no longer exists (e.g. killed with SIGKILL) -> FAIL,
    so that they do not count towards n_trials; their MLflow runs -> KILLED. Finished trials are kept. A process
    is known by its pid and its start time, as a pid is reused once its process has ended."""
    host = socket.gethostname()
    abandoned = []
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        worker_host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid), trial.user_attrs.get("worker_started")):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            abandoned.append(trial.number)
            _end_mlflow_runs(study.study_name, trial.number, "abandoned: its worker process died")
    return abandoned


def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Optuna's own heartbeat thread for the trial, as Study.optimize runs it (ask-and-tell has none); a context
    manager that does nothing when the storage has no heartbeats."""
    return optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, study._storage)


def fail_stale_trials(study: optuna.Study) -> None:
    """With heartbeats, running trials whose worker has stopped beating -> FAIL, on any host, so that they do not
    count towards n_trials; Optuna calls `_stale_trial_failed` for each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _stale_trial_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    log.info("trial %d: its worker stopped beating; marked FAIL", trial.number)
    _end_mlflow_runs(study.study_name, trial.number, "stale: its worker stopped beating")


def _end_mlflow_runs(study_name: str, trial_number: int, reason: str) -> None:
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial` = '{trial_number}' "
        "and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, "KILLED")


def _started(pid: int) -> float:
    """When process `pid` started, in seconds since the host booted: unlike seconds since the epoch, this does not
    move when the system clock is stepped (NTP, a resumed VM)."""
    return round(psutil.Process(pid).create_time() - psutil.boot_time(), 2)


def _alive(pid: int, started: float | None = None) -> bool:
    """Whether process `pid` runs, and is the one that started at `started` (when given)."""
    if started is None:  # a trial from before start times were stored
        return psutil.pid_exists(pid)
    try:
        return _started(pid) == started
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class PruningCallback(keras.callbacks.Callback):
    """Reports what the job selects on (val accuracy, or val_selection with trainer.select_on) to the trial after each
    epoch, and prunes it when the pruner says so."""

    def __init__(self, sweeper_cfg: DictConfig, trial_number: int):
        super().__init__()
        # Optuna's Trial constructor wants the storage's trial id, not the number the sweeper passed on.
        storage = make_storage(sweeper_cfg.storage)
        study = optuna.load_study(study_name=sweeper_cfg.study_name, storage=storage,
                                  pruner=make_pruner(sweeper_cfg.pruner))
        study_id = storage.get_study_id_from_name(sweeper_cfg.study_name)
        self.trial = optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, trial_number))
        self.study_name = sweeper_cfg.study_name

    def on_train_begin(self, logs=None):
        mlflow.set_tags({"optuna.study": self.study_name, "optuna.trial": str(self.trial.number)})

    def on_epoch_end(self, epoch, logs=None):
        value = float(logs.get("val_selection", logs["val_accuracy"]))  # what the job selects on
        self.trial.report(value, step=epoch + 1)
        if self.trial.should_prune():
            mlflow.set_tag("optuna.state", "PRUNED")
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at {value:.4f}")


def log_study(study: optuna.Study, storage: str | None) -> None:
    """The study's best trial and Optuna's own plots, on the sweep's MLflow run; `make report` finds the
    study again through the run's optuna.study and optuna.storage tags."""
    from src import plots  # matplotlib with the Agg backend

    run_id = os.environ.get(SWEEP_RUN_ENV)
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    states = [t.state for t in study.get_trials(deepcopy=False)]
    client.set_tag(run_id, "optuna.study", study.study_name)
    if storage:
        client.set_tag(run_id, "optuna.storage", sqlalchemy.engine.make_url(storage).render_as_string())  # no password
    for state in optuna.trial.TrialState:
        client.log_metric(run_id, f"trials/{state.name.lower()}", states.count(state))
    if not any(state == optuna.trial.TrialState.COMPLETE for state in states):
        return
    best = study.best_trial
    client.set_tag(run_id, "optuna.best_trial", str(best.number))
    client.log_metric(run_id, "optuna/best_value", best.value)
    for name, value in best.params.items():
        client.set_tag(run_id, f"optuna.best.{name}", str(value))
    for artifact_file, figure in study_figures(study).items():
        client.log_figure(run_id, figure, f"optuna/{artifact_file}")
        plots.plt.close(figure)


def study_figures(study: optuna.Study) -> dict:
    """Optuna's optimization history and, with two or more complete trials and parameters, the parameter
    importances, as matplotlib figures keyed by file name."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return {}
    plot_functions = {"optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history}
    if len(complete) > 1 and len(study.best_trial.params) > 1:
        plot_functions["param_importances.png"] = optuna.visualization.matplotlib.plot_param_importances
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Optuna's matplotlib plots
        for name, plot in plot_functions.items():
            figure = plot(study).figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            figures[name] = figure
    return figures
