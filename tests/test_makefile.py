"""`make help`, the Makefile's default target: every target with what it does."""

import re
import subprocess

import pytest

from src.config import PROJECT_ROOT

MAKEFILE = (PROJECT_ROOT / "Makefile").read_text()


def make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def help_lines() -> dict[str, str]:
    """The help output as {target: description}."""
    lines = [re.match(r"\s+(\S+)\s+(.+)$", line) for line in make("help").splitlines()]
    return {m[1]: m[2] for m in lines if m}


@pytest.mark.parametrize("target, description", [
    ("install", "create .venv and install the core for a CPU machine"),
    ("install-all", "install every extra"),
    ("test", "the whole test suite"),
    ("train", "one training job"),
    ("ui", "the MLflow UI"),
    ("register-best", "register the best run as models:/flowers@champion"),
    ("serve-best", "serve models:/flowers@champion with MLflow's scoring server"),
])
def test_make_help_lists_the_main_targets_with_their_descriptions(target, description):
    assert description in help_lines()[target]


def test_every_phony_target_is_in_the_help_with_its_makefile_description():
    phony = re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M)[1].split()
    described = dict(re.findall(r"^([a-zA-Z0-9_-]+):[^\n]*?##\s+(.+)$", MAKEFILE, re.M))
    listed = help_lines()
    assert {"install", "test", "help"} <= set(phony)
    assert [t for t in phony if t not in listed] == []  # a target added without a ## description shows here
    assert {t: listed[t] for t in phony} == {t: described[t] for t in phony}


def test_make_alone_prints_the_help():
    assert make() == make("help")
