"""Print the links that open each of the project's experiments on its training runs in the MLflow UI (make ui).

    .venv/bin/python scripts/ui_links.py <tracking URI> <UI URL>

MLflow 3.17's UI opens an experiment on its GenAI view in a new browser (mlflow/mlflow#24498); these links ask for
the training runs (`workflowType` sets the UI's sidebar switch). Imports MLflow only, so make ui starts quickly.
"""

import sys

import mlflow

from src.config import EXPERIMENT_KIND


def training_runs_links(ui_url: str) -> list[str]:
    """For the MLflow UI at `ui_url`: a link per experiment of the project's kind in the current store."""
    [(key, kind)] = EXPERIMENT_KIND.items()
    experiments = mlflow.search_experiments(filter_string=f"tags.`{key}` = '{kind}'")
    return [f"{e.name}: {ui_url}/#/experiments/{e.experiment_id}?workflowType=machine_learning" for e in experiments]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: scripts/ui_links.py <tracking URI> <UI URL>, e.g. sqlite:///mlflow.db http://127.0.0.1:5000")
    uri, ui_url = sys.argv[1:]
    mlflow.set_tracking_uri(uri)
    links = training_runs_links(ui_url)
    if not links:
        print(f"no training runs in {uri} yet: after python train.py, make ui prints the link to them")
    for link in links:
        print(f"the training runs of {link}")


if __name__ == "__main__":
    main()
