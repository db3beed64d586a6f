"""Several hosts in one test: network namespaces on a private bridge stand for a server (its own PostgreSQL and
the team tracking server) and for worker machines sharing one Optuna study; one worker dies by SIGKILL."""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

import mlflow
import optuna
import pytest

from src.config import PROJECT_ROOT
from src.search import make_storage
from tests.helpers import running
from tests.test_sweep import command, environment, finished, poll, search, trial_with_run

HOSTS = ["server", "worker1", "worker2", "client"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """{host name: (its namespace, its address)}: one namespace per host, each with lo and a veth into a bridge of
    the root namespace on an unused 10.213.x.0/24, so that this process reaches them too. Nothing routes beyond the
    bridge. Skips where namespaces are refused."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's ip")
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    subnet = random.choice([f"10.213.{x}" for x in range(1, 255) if f" 10.213.{x}." not in used])
    token = uuid.uuid4().hex[:6]
    bridge, namespaces = f"fl{token}br", {name: f"flowers-{token}-{name}" for name in HOSTS}
    created = []
    try:
        try:
            ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot create network interfaces: {error.stderr.strip()}")
        ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, (name, namespace) in enumerate(namespaces.items(), 1):
            ip("netns", "add", namespace)
            created.append(namespace)
            ip("link", "add", f"fl{token}v{i}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("link", "set", f"fl{token}v{i}", "master", bridge, "up")
            ip("-n", namespace, "addr", "add", f"{subnet}.{i}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        yield {name: (namespace, f"{subnet}.{i}") for i, (name, namespace) in enumerate(namespaces.items(), 1)}
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # its veth goes with it
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def in_host(namespace: str, hostname: str, *argv: str) -> list[str]:
    """argv run in the host's namespace under its own host name: the workers would share the machine's otherwise,
    and a survivor would fail its peer's trial by the pid check for one host, not by the heartbeats."""
    return ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname,
            *argv]


@pytest.fixture
def server_postgres(hosts):
    """A PostgreSQL of its own on the server host, port 5432 of its address, trusting the bridge's subnet; yields
    its URL without a database. The machine's shared PostgreSQL is never used."""
    namespace, address = hosts["server"]
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql")
    as_postgres = ["runuser", "-u", "postgres", "--"]  # initdb and postgres refuse to run as root
    # Not under tmp_path: pytest's base temp dir is root's alone, and postgres must own and reach its data dir.
    home = Path(tempfile.mkdtemp(prefix="flowers-pg-"))
    shutil.chown(home, "postgres")
    data = home / "data"
    try:
        subprocess.run([*as_postgres, f"{bins[-1]}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust"],
                       check=True, capture_output=True)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {address.rpartition('.')[0]}.0/24 trust\n")
        options = (f"-c listen_addresses={address} -c port=5432 -c unix_socket_directories={home} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        started = subprocess.run(["ip", "netns", "exec", namespace, *as_postgres, f"{bins[-1]}/pg_ctl", "start", "-w",
                                  "-D", str(data), "-l", str(home / "log"), "-o", options],
                                 capture_output=True, text=True)
        assert started.returncode == 0, started.stderr + (home / "log").read_text()
        yield f"postgresql://postgres@{address}:5432"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, f"{bins[-1]}/pg_ctl", "stop", "-D", str(data), "-m", "immediate"],
                           capture_output=True)
        shutil.rmtree(home)


@pytest.mark.slow
def test_a_worker_host_dies_and_the_other_finishes_the_study_through_the_server_host(
        tmp_path, tiny_backbone, hosts, server_postgres):
    """A team search as on several machines: workers on other hosts than the server, one of which dies mid-trial
    with no one left on its host to notice; its peer fails the trial by the heartbeats and finishes the study."""
    start, timeline = datetime.now(), {}

    def happened(what: str, at: datetime | None = None) -> None:
        timeline[what] = round(((at or datetime.now()) - start).total_seconds(), 1)

    def story() -> str:
        events = sorted(timeline.items(), key=lambda event: event[1])
        return "timeline (s from the start): " + ", ".join(f"{what} {at}" for what, at in events)

    server_ns, server = hosts["server"]
    optuna_url, n_trials = f"{server_postgres}/optuna", 4
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(f"{server_postgres}/postgres", autocommit=True) as admin:
        admin.execute("CREATE DATABASE optuna")
    storage = make_storage(optuna_url)  # its tables, before the workers race to create them
    server_env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"{server_postgres}/mlflow", "HOST": server,
                  "MLFLOW_PORT": "5000", "ARTIFACTS_DIR": str(tmp_path / "server_artifacts")}
    overrides = [*search(tmp_path, optuna_url, n_trials, study="hosts"), "epochs=8", "model.normalize_features=false",
                 "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    processes, logs = {}, {}
    with running(["ip", "netns", "exec", server_ns, sys.executable, "scripts/tracking_server.py", "--workers", "1"],
                 5000, server_env, "/health", host=server) as url:
        happened("server up")
        try:
            for name in ("worker1", "worker2"):
                logs[name] = tmp_path / f"{name}.log"
                with open(logs[name], "w") as log:
                    processes[name] = subprocess.Popen(
                        in_host(hosts[name][0], name, *command(tmp_path, tiny_backbone, *overrides)), cwd=PROJECT_ROOT,
                        env={**environment(tmp_path), "MLFLOW_TRACKING_URI": url}, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)
            happened("workers started")
            client = mlflow.MlflowClient(url)
            trial, run = poll(lambda: trial_with_run(storage, client, "hosts"), 600, "trial in training")
            victim_name = trial.user_attrs["worker"].partition(":")[0]
            victim = processes[victim_name]
            os.killpg(victim.pid, signal.SIGKILL)
            happened(f"trial {trial.number} began on {victim_name}", trial.datetime_start)
            happened(f"SIGKILL {victim_name}")
            victim.wait(timeout=30)
            [(survivor_name, survivor)] = [(n, p) for n, p in processes.items() if p is not victim]
            returncode = survivor.wait(timeout=600)
            happened(f"{survivor_name} finished the study")
            assert returncode == 0, f"{logs[survivor_name].read_text()[-3000:]}\n{story()}"

            study = optuna.load_study(study_name="hosts", storage=storage)
            killed = study.trials[trial.number]
            killed_run = client.get_run(run.info.run_id)
            happened("trial failed", killed.datetime_complete)
            happened("its run ended", datetime.fromtimestamp(killed_run.info.end_time / 1000))
            assert killed.state == optuna.trial.TrialState.FAIL, story()
            assert (killed_run.info.status, killed_run.data.tags.get("error")) == (
                "KILLED", "stale: its worker stopped beating"), story()
            done = finished(study)
            assert len(done) == n_trials and not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)), story()

            # Every finished trial's artifacts, fetched through the server from a host that ran none of them.
            runs = {t.number: client.search_runs([run.info.experiment_id], f"tags.`optuna.study` = 'hosts' and "
                                                 f"tags.`optuna.trial` = '{t.number}'")[0] for t in done}
            fetch = ("import sys, mlflow\nfor run_id in sys.argv[2:]:\n"
                     "    mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=f'{sys.argv[1]}/{run_id}')")
            fetched = subprocess.run(["ip", "netns", "exec", hosts["client"][0], sys.executable, "-c", fetch,
                                      str(tmp_path / "fetched"), *(r.info.run_id for r in runs.values())],
                                     env={**os.environ, "MLFLOW_TRACKING_URI": url}, capture_output=True, text=True,
                                     timeout=300)
            happened("artifacts fetched")
            assert fetched.returncode == 0, f"{fetched.stderr[-3000:]}\n{story()}"
        finally:
            for process in processes.values():
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            print(f"\n{story()}; {(datetime.now() - start).total_seconds():.0f} s in all", flush=True)

    for trial in done:
        folder = tmp_path / "fetched" / runs[trial.number].info.run_id
        assert (folder / "config.yaml").is_file(), trial.number  # logged as the run starts, pruned or not
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert (folder / "saved_model" / "flowers" / "1" / "saved_model.pb").is_file(), trial.number
