"""One TensorFlow on a CPU: packaging/tensorflow-cpu-alias is the distribution `tensorflow`, by tensorflow-cpu."""

import importlib.metadata
import re
import tomllib

import pytest

from src.config import PROJECT_ROOT

ALIAS = tomllib.loads((PROJECT_ROOT / "packaging/tensorflow-cpu-alias/pyproject.toml").read_text())["project"]
EXTRAS = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
CONSTRAINTS = (PROJECT_ROOT / "constraints.txt").read_text()


def test_the_alias_the_extras_and_the_constraints_name_one_tensorflow_version():
    version = ALIAS["version"]
    assert ALIAS["name"] == "tensorflow"
    assert ALIAS["dependencies"] == [f"tensorflow-cpu=={version}"]
    assert EXTRAS["cpu"] == [f"tensorflow-cpu=={version}"]
    assert EXTRAS["gpu"] == [f"tensorflow[and-cuda]=={version}"]
    assert re.search(rf"^tensorflow-cpu=={re.escape(version)}$", CONSTRAINTS, re.M)
    # `make lock` leaves `tensorflow` out: on a CPU it is the alias, a local path; the gpu extra pins its own.
    assert not re.search(r"^tensorflow==", CONSTRAINTS, re.M)


def test_the_installed_tensorflow_is_tensorflow_cpu_alone():
    try:
        cpu = importlib.metadata.distribution("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorflow-cpu is not installed: this environment was made with another TF_EXTRA (gpu)")
    alias = importlib.metadata.distribution("tensorflow")
    # The full wheel would own the package's files; the alias owns its metadata only.
    assert [f for f in alias.files if not f.parts[0].endswith(".dist-info")] == []
    assert alias.version == cpu.version
    assert any(str(f) == "tensorflow/__init__.py" for f in cpu.files)
    # and its files are on disk: pip replacing the full wheel by the alias in place deletes them (docs/installation.md)
    assert all(cpu.locate_file(f).exists() for f in cpu.files if f.parts[0] == "tensorflow")


def test_install_size_follows_the_cores_requirements_and_what_a_swap_takes_off(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "scripts"))
    import install_size

    core = install_size.closure({})
    assert {"tensorflow-cpu", "mlflow", "scikit-learn", "scipy", "pyarrow"} <= core
    assert "fsspec" in core  # only through an extra: tensorflow-datasets requires etils[epath], which requires it
    assert not {"pytest", "openvino", "playwright"} & core  # extras other than cpu stay out
    swapped = install_size.closure({"scikit-learn": []})
    assert swapped < core and "scikit-learn" not in swapped and "scipy" in swapped  # full MLflow requires scipy too
    assert install_size.main(["--swap", "scikit-learn="]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"core: \d+ distributions, ([\d,]+) MB on disk", out)[1].replace(",", ""))
    assert total > install_size.size_mb("tensorflow-cpu") > 100
    assert re.search(rf"with scikit-learn -> nothing: {len(core - swapped)} fewer \(scikit-learn \d+, ", out)
    assert install_size.main(["--swap", "mlflow"]) == 1
    assert "is not NAME=[OTHER,...]" in capsys.readouterr().err
