"""A Hydra sweeper on Optuna's ask-and-tell interface, with current Optuna and pruning.

`python train.py -m hparams_search=<name>` selects it. It asks the study for a trial, launches one job with the
sampled values as overrides plus `+optuna_trial=<number>` (the job reports per-epoch val accuracy to the
trial, so the pruner can stop it), and tells the study the result. `n_trials` counts the study's finished and
running trials across all workers and runs, so re-running the command resumes the study, and several
processes with the same storage share it. With `heartbeat_interval` (RDB storages), each worker beats for its
running trial through Optuna's heartbeats, fails the trials of workers that stopped beating before each ask, and
waits for the other workers' running trials instead of leaving, so that a dead worker's trial is replaced.
"""


import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.flowers_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    study_name: str = "flowers"
    storage: Optional[str] = None  # SQLAlchemy URL or journal:///path/file.log; None: in memory
    n_trials: int = 20
    direction: str = "maximize"
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "TPESampler", "seed": 42})
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "MedianPruner"})
    params: Dict[str, Any] = field(default_factory=dict)
    max_failures_in_a_row: int = 3
    heartbeat_interval: Optional[int] = None  # seconds; RDB storages only; None: no heartbeats
    grace_period: Optional[int] = None  # seconds without a beat before a trial is failed; None: 2 intervals


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="flowers")


class OptunaSweeper(Sweeper):
    def __init__(self, **cfg: Any) -> None:
        self.cfg = OmegaConf.create(cfg)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> List[Any]:
        from src import search
        from src.sweep import end_sweep

        fixed = OverridesParser.create().parse_overrides(arguments)
        if any(o.is_sweep_override() for o in fixed):
            raise ValueError("hparams_search: put searched values in the search space, not on the command line")
        study = search.load_study(self.cfg)
        log.info("study %s in %s: %d of %d trials finished or running", self.cfg.study_name, self.cfg.storage,
                 len(search.counted_trials(study)), self.cfg.n_trials)
        try:
            returns = self._run_trials(study, arguments)
        except BaseException:
            search.log_study(study, self.cfg.storage)
            end_sweep("FAILED")  # Hydra calls on_multirun_end only after a sweep that returns
            raise
        search.log_study(study, self.cfg.storage)
        return returns

    def _run_trials(self, study: optuna.Study, arguments: List[str]) -> List[Any]:
        from src import search

        returns, failures = [], 0
        while True:
            if self.cfg.heartbeat_interval is not None:
                search.fail_stale_trials(study)
            elif abandoned := search.fail_abandoned_trials(study):
                log.info("trials %s were left running by a killed process: marked FAIL", abandoned)
            trial = search.next_trial(study, self.cfg.n_trials, self.cfg.sampler)
            if trial is None and self.cfg.heartbeat_interval is not None and _others_running(study):
                time.sleep(self.cfg.heartbeat_interval)  # until they finish, or stop beating and are replaced
                continue
            if trial is None:
                return returns
            try:
                values = search.suggest(trial, self.cfg.params)
            except optuna.TrialPruned as pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info("trial %d PRUNED before it ran: %s", trial.number, pruned)
                continue
            overrides = [*arguments, *(f"{name}={_override(value)}" for name, value in values.items()),
                         f"+optuna_trial={trial.number}"]
            log.info("trial %d/%d (%s so far): %s", trial.number + 1, self.cfg.n_trials, _states(study),
                     " ".join(overrides[len(arguments):-1]))
            with search.heartbeat(study, trial):
                [job] = self.launcher.launch([overrides], initial_job_idx=trial.number)
            state, value = _outcome(job)
            study.tell(trial, value, state=state, skip_if_finished=True)  # failed meanwhile as stale: replaced
            log.info("trial %d %s: %s", trial.number, state.name, value if value is not None else job._return_value)
            failures = failures + 1 if state == optuna.trial.TrialState.FAIL else 0
            if failures >= self.cfg.max_failures_in_a_row:
                raise RuntimeError(f"{failures} trials in a row failed; see the job logs in {self.config.hydra.sweep.dir}")
            returns.append(job)


def _others_running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def _states(study: optuna.Study) -> str:
    """e.g. "5 complete, 2 pruned, 0 fail", over the whole study (every worker)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return ", ".join(f"{states.count(s)} {s.name.lower()}" for s in (optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED,
                                                                   optuna.trial.TrialState.FAIL))


def _override(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(_override, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _outcome(job) -> tuple[optuna.trial.TrialState, Optional[float]]:
    """COMPLETE with the objective, PRUNED (the job raised TrialPruned), or FAIL. Hydra keeps a failed job's
    exception in `_return_value` (its `return_value` property re-raises it)."""
    if isinstance(job._return_value, optuna.TrialPruned):
        return optuna.trial.TrialState.PRUNED, None
    if isinstance(job._return_value, float):
        return optuna.trial.TrialState.COMPLETE, job._return_value
    return optuna.trial.TrialState.FAIL, None
