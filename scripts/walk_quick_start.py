"""Follow the README's quick start as written, in a fresh clone, and time each step up to the served prediction.

    .venv/bin/python scripts/walk_quick_start.py [--keep]

Reads the bash block under "## Quick start" in README.md and runs it line by line in one bash shell, in a
throw-away folder that holds a clone of this repository's HEAD and, next to it, `shared` (a link to the
prepared data, as the README assumes). Three things stand in for the reader: the clone comes from this
repository instead of `<repository URL>`; the lines marked "in another terminal" (`make ui`, `make serve-best`)
run in the background, and their step lasts until their port answers; `rose.jpg` is the first rose of the test
split. The environment is a new user's: pip's cache off (every wheel downloaded), no MLflow, cache or TFDS
variables. Prints each step's wall time, the total, the size of the `.venv` that `make install` built (as
`du -sm` counts it), and the prediction; exits non-zero if a step fails or the answer holds no prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import tensorflow_datasets as tfds

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BACKGROUND = "in another terminal"
PORTS = {"make ui": 5000, "make serve-best": 8080}  # the Makefile's UI_PORT and PORT


def quick_start_lines(readme: str) -> list[str]:
    """The commands of the README's quick-start block, continuation lines joined."""
    match = re.search(r"^## Quick start\n.*?```bash\n(.*?)```", readme, re.S | re.M)
    if not match:
        raise SystemExit("error: README.md has no ```bash block under '## Quick start'")
    joined = re.sub(r"\\\n\s*", "", match.group(1))
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def save_a_rose(path: Path) -> None:
    """The first test image labelled rose, as the JPEG the reader would send."""
    builder = tfds.builder("oxford_flowers102", data_dir=str(SHARED / "tensorflow_datasets"))
    rose = builder.info.features["label"].str2int("rose")
    for example in builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()}):
        if int(example["label"]) == rose:
            path.write_bytes(example["image"].numpy())
            return


def as_run_here(line: str, step: int, work: Path) -> str:
    """The README line as this script runs it: the clone from here, servers in the background until they answer."""
    line = line.replace("<repository URL>", shlex.quote(str(ROOT)))
    if BACKGROUND not in line:
        return line
    command = line.split("#")[0].strip()
    port = next(p for target, p in PORTS.items() if command.startswith(target))
    # setsid: a process group of its own, which stop_background ends with the server's children
    return (f"setsid {command} > {work}/step{step}.log 2>&1 & echo $! >> {work}/background.pids; "
            f"until curl -sf -o /dev/null http://127.0.0.1:{port}/; do sleep 0.5; "
            f"kill -0 $(tail -1 {work}/background.pids) || {{ echo '{command} exited'; exit 1; }}; done")


def walk(work: Path) -> tuple[list[tuple[str, float]], str]:
    """Run the quick start in `work`: each README line with its wall time, and the last line's output."""
    lines = quick_start_lines((ROOT / "README.md").read_text())
    (work / "shared").symlink_to(SHARED)
    script = ["set -euo pipefail", f"cd {work}"]
    for step, line in enumerate(lines):
        if "rose.jpg" in line:
            script.append(f"cp {work}/rose.jpg rose.jpg")
        script += [f"echo '@@start {step}' $(date +%s.%N) >&2", as_run_here(line, step, work),
                   f"echo '@@end {step}' $(date +%s.%N) >&2"]
    env = {k: v for k, v in os.environ.items()
           if k not in {"MLFLOW_TRACKING_URI", "FLOWERS_CACHE_DIR", "TFDS_DATA_DIR", "VIRTUAL_ENV", "PYTHONPATH"}}
    env["PIP_NO_CACHE_DIR"] = "1"
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(str(ROOT)))
    done = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True)
    (work / "walk.log").write_text(done.stderr)
    marks = dict(re.findall(r"^@@(\w+ \d+) ([\d.]+)$", done.stderr, re.M))
    times = [(lines[step], float(marks[f"end {step}"]) - float(marks[f"start {step}"]))
             for step in range(len(lines)) if f"end {step}" in marks]
    if done.returncode != 0:
        failed = lines[len(times)]
        raise SystemExit(f"error: the step `{failed}` failed (exit code {done.returncode}); output: {work}/walk.log")
    return times, done.stdout.strip().splitlines()[-1]


def stop_background(work: Path) -> None:
    pids = work / "background.pids"
    for pid in pids.read_text().split() if pids.exists() else []:
        try:
            os.killpg(int(pid), signal.SIGTERM)  # after setsid, its pid is its process group's
        except ProcessLookupError:
            pass


def check_ports_free() -> None:
    """The servers' ports must be free: a server already there would answer in their place."""
    for target, port in PORTS.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"error: port {port}, which {target} uses, is taken; stop what listens there first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the throw-away folder (its path is printed)")
    args = parser.parse_args()
    check_ports_free()
    work = Path(tempfile.mkdtemp(prefix="quick-start-"))
    print(f"working in {work}", flush=True)
    save_a_rose(work / "rose.jpg")
    start = time.perf_counter()
    try:
        times, answer = walk(work)
    finally:
        stop_background(work)
    total = time.perf_counter() - start
    for line, seconds in times:
        print(f"{seconds:7.1f} s  {line.split('#')[0].strip()[:100]}")
    print(f"{total:7.1f} s  in all ({total / 60:.1f} min), clone to served prediction")
    [venv] = work.glob("*/.venv")
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout.split()[0]
    print(f"{int(size):,} MB  the .venv that make install built (du -sm)")
    top = json.loads(answer)["predictions"][0]
    print(f"the served prediction for rose.jpg: {json.dumps(top)[:300]}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
