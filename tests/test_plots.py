import subprocess
import sys

import numpy as np
from PIL import Image

from src import plots
from src.config import PROJECT_ROOT


def test_sample_predictions_title_each_image_green_when_right_red_when_wrong():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    figure = plots.sample_predictions(images, np.array([0, 0, 0]), probabilities, ["daisy", "rose"], "test")
    titles = [(ax.get_title(), ax.title.get_color()) for ax in figure.axes if ax.get_title()]
    assert titles == [("daisy (90%)\ntrue: daisy", "green"), ("rose (80%)\ntrue: daisy", "red"),
                      ("daisy (70%)\ntrue: daisy", "green")]


def test_show_examples_draws_a_grid_of_the_split_with_class_names(tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "scripts/show_examples.py", "--split", "validation", "--n", "6",
                             "--out", str(out), "data=synthetic"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 validation images of synthetic" in result.stdout
    width, height = Image.open(out).size
    assert width > height > 100  # 5 columns, 2 rows
    failed = subprocess.run([sys.executable, "scripts/show_examples.py", "--n", "0", "data=synthetic"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("error: --n 0 is invalid")
