"""CPU runtimes: float16 and int8 TFLite models and an OpenVINO model of a run (synthetic data, tiny backbone),
compared with its SavedModel, logged to the run; scripts/predict.py --tflite."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from src.config import PROJECT_ROOT, UserError
from src.data import load_splits, make_batches
from src.pipeline import run_job
from src.runtimes import Classifier, OpenVINOClassifier, agreement, convert, input_sizes, interpreter

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import export_tflite  # noqa: E402


@pytest.fixture
def exported(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 3, "lr": 0.05, "model": {"augmentation": {"enabled": False}}})
    run_job(cfg, tmp_path / "job")
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    out = tmp_path / "tflite"
    assert export_tflite.main(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(out),
                               "--representative", "40"]) == 0
    return run, out / f"run-{run.info.run_id}", cfg


def test_float16_and_int8_models_match_the_saved_model_and_are_logged_to_the_run(exported):
    run, folder, _ = exported
    assert {p.name for p in folder.iterdir()} == {
        "float16.tflite", "int8.tflite", "int8_dynamic.tflite", "openvino.xml", "openvino.bin", "labels.txt", "views.txt",
        "comparison.csv", "comparison.md", "comparison.png"}
    table = pd.read_csv(folder / "comparison.csv")
    assert list(table["model"])[:4] == ["saved_model", "float16", "int8", "int8_dynamic"]
    assert set(table["images"]) == {80}
    assert table["model"][4] == "openvino (f32)"  # float32 also on CPUs with bfloat16
    assert table.loc[0, "test/accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
    assert (table["agreement_with_saved_model"] >= 0.95).all() and (table["test/accuracy"] >= 0.75).all()
    assert (table["agreement_low"] <= table["agreement_with_saved_model"]).all()
    assert (table["agreement_with_saved_model"] <= table["agreement_high"]).all() and table["agreement_low"][0] == 1
    sizes = dict(zip(table["model"], table["size_mb"]))
    assert sizes["int8"] <= sizes["float16"] < sizes["saved_model"]
    assert table["size_mb"][4] == pytest.approx(sum((folder / f).stat().st_size for f in ("openvino.xml", "openvino.bin"))
                                                / 2**20)
    assert sizes["int8"] == pytest.approx((folder / "int8.tflite").stat().st_size / 2**20)
    assert (table["latency_ms"] > 0).all()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tflite")}
    assert logged == {f"tflite/{p.name}" for p in folder.iterdir()}
    assert (folder / "labels.txt").read_text().split() == ["red", "green", "blue", "yellow"]
    assert (folder / "views.txt").read_text().split() == ["identity"]  # the run's model.tta
    assert OpenVINOClassifier(folder / "openvino.xml", threads=1).compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_the_served_runtimes_agreement_is_read_from_its_own_row_of_the_comparison(tmp_path):
    models = ["saved_model", "float16", "int8", "int8_dynamic", "openvino (f32)"]
    pd.DataFrame({"model": models, "validation/accuracy": 0.8, "agreement_with_saved_model": [1, .99, .9, .97, .98],
                  "agreement_low": [1, .985, .89, .96, .975], "agreement_high": [1, .995, .91, .98, .985],
                  "images": 50}).to_csv(tmp_path / "comparison.csv", index=False)
    csv = tmp_path / "comparison.csv"
    assert agreement("tflite", tmp_path) == \
        f"tflite agreed with the SavedModel on 90.00 % [89.00, 91.00] of 50 validation images ({csv})"
    for runtime, figures in (("tflite_int8_dynamic", "97.00 % [96.00, 98.00]"),
                             ("tflite_float16", "99.00 % [98.50, 99.50]"), ("openvino", "98.00 % [97.50, 98.50]")):
        assert agreement(runtime, tmp_path).startswith(f"{runtime} agreed with the SavedModel on {figures} of 50 ")
    pd.read_csv(csv).iloc[:4].to_csv(csv, index=False)  # an export made without openvino installed
    assert agreement("openvino", tmp_path).startswith(f"no row for openvino in {csv}: make export-tflite measures")
    missing = tmp_path / "none"
    assert agreement("tflite", missing).startswith(f"no comparison in {missing}: make export-tflite measures")


def test_the_int8_model_is_integer_inside_and_takes_uint8_images(exported):
    _, folder, cfg = exported
    classifier = Classifier(folder / "int8.tflite")
    tensors = interpreter(folder / "int8.tflite").get_tensor_details()
    assert sum(d["dtype"] == np.int8 for d in tensors) > len(tensors) / 2  # weights and activations
    images, labels = next(iter(make_batches(load_splits(cfg.data).test, classifier.input_sizes, 80)))
    probabilities = classifier({name: batch.numpy() for name, batch in images.items()})
    assert probabilities.shape == (80, 4) and np.allclose(probabilities.sum(axis=1), 1, atol=0.02)
    assert (probabilities.argmax(axis=1) == labels.numpy()).mean() >= 0.75


def test_dynamic_range_stores_the_large_weights_as_int8_and_computes_in_float(tmp_path):
    import tensorflow as tf

    module = tf.Module()  # the tiny backbone's weights are too small for the converter to quantise
    module.weights = tf.Variable(tf.random.stateless_normal([192, 64], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8, name="images")])
    def classify(images):
        return {"probabilities": tf.nn.softmax(tf.reshape(tf.cast(images, tf.float32) / 255, [-1, 192]) @ module.weights)}

    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"classify_resized": classify})
    dynamic, float16 = convert(tmp_path / "model", "int8_dynamic"), convert(tmp_path / "model", "float16")
    assert any(d["dtype"] == np.int8 and d["shape"].tolist() == [64, 192]
               for d in interpreter(dynamic).get_tensor_details())
    assert not any(d["dtype"] == np.int8 for d in interpreter(float16).get_tensor_details())
    assert len(dynamic) < len(float16)
    runner = interpreter(dynamic).get_signature_runner("classify_resized")
    assert [d["dtype"] for d in runner.get_input_details().values()] == [np.uint8]
    assert [d["dtype"] for d in runner.get_output_details().values()] == [np.float32]
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    got, want = runner(images=images)["probabilities"], classify(images)["probabilities"].numpy()
    np.testing.assert_allclose(got, want, atol=0.05)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.9


def test_predict_runs_the_tflite_file_and_rejects_what_is_not_an_image(exported, tmp_path):
    _, folder, cfg = exported
    files = []
    for i, (image, label) in enumerate(load_splits(cfg.data).test.shard(20, 0)):
        files.append(tmp_path / f"{i}_{int(label)}.jpg")
        files[-1].write_bytes(image.numpy())
    result = subprocess.run([sys.executable, "scripts/predict.py", *map(str, files), "--tflite",
                             str(folder / "int8.tflite"), "--json"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(files) == 4 and all(len(r["top_k"]) == 4 for r in rows)
    right = [r["top_k"][0]["label"] == int(r["file"].rsplit("_", 1)[1].split(".")[0]) for r in rows]
    assert sum(right) >= 3
    (tmp_path / "notes.txt").write_text("not an image")
    bad = subprocess.run([sys.executable, "scripts/predict.py", str(tmp_path / "notes.txt"), "--tflite",
                          str(folder / "int8.tflite")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'notes.txt'}: image 0 is not an image; "
                                                   "send JPEG, PNG, GIF, BMP, WEBP")


def test_backbones_of_two_sizes_export_with_one_input_per_size(synthetic_cfg, tiny_backbone, tmp_path, capsys):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 3, "lr": 0.05, "backbones": [{"name": "small", "handle": tiny_backbone,
                                                            "input_size": [32, 32]},
                                                           {"name": "large", "handle": tiny_backbone,
                                                            "input_size": [48, 48]}]})
    run_job(cfg, tmp_path / "job")
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    out = tmp_path / "tflite"
    capsys.readouterr()
    assert export_tflite.main(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(out),
                               "--representative", "40"]) == 0
    progress = capsys.readouterr().err
    assert "converting: 100%" in progress and "4/4" in progress  # float16, int8, int8_dynamic, OpenVINO
    assert "test images through 5 models: 100%" in progress and "80/80" in progress
    folder = out / f"run-{run.info.run_id}"
    assert Classifier(folder / "int8.tflite").input_sizes == {"images_32x32": (32, 32), "images_48x48": (48, 48)}
    table = pd.read_csv(folder / "comparison.csv")
    assert len(table) == 5 and table.loc[0, "test/accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
    assert (table["agreement_with_saved_model"] >= 0.95).all()


def test_a_saved_model_without_the_resized_images_signature_is_a_one_line_error(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(lambda x: x + 1, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "old"), signatures={"serving_default": module.f})
    with pytest.raises(UserError, match="has no 'classify_resized' signature: an older version of this project exported it"):
        input_sizes(tmp_path / "old")


def test_without_a_champion_export_tflite_says_what_to_do(tracking_uri, capsys):
    assert export_tflite.main([]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: model 'flowers' has no champion in {tracking_uri}; train, then run make register-best"]


def test_an_unknown_quantization_or_int8_without_calibration_images_is_a_user_error(exported):
    _, folder, _ = exported
    with pytest.raises(UserError, match="quantization 'int4' is unknown; use one of: float16, int8, int8_dynamic"):
        convert(folder, "int4")
    with pytest.raises(UserError, match="int8 conversion needs representative train images to calibrate on"):
        convert(folder, "int8", {"images": np.zeros((0, 32, 32, 3), np.uint8)})


def test_a_failed_conversion_keeps_the_previous_export_and_logs_nothing_more(exported, monkeypatch, capsys):
    from tensorflow.lite.python.convert import ConverterError

    from src import runtimes

    run, folder, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tflite")}

    def fail(*args, **kwargs):
        raise ConverterError("op not supported")
    monkeypatch.setattr(runtimes, "convert", fail)
    assert export_tflite.main(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(folder.parent)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot convert runs:/{run.info.run_id}/model: op not supported")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tflite")} == logged


def test_a_comparison_on_part_of_test_is_written_but_not_logged_over_the_full_one(exported, capsys):
    run, folder, _ = exported
    full = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tflite/comparison.csv"))
    assert export_tflite.main(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(folder.parent),
                               "--representative", "10", "--images", "20"]) == 0
    assert "(not logged to the run: part of test)" in capsys.readouterr().out
    assert set(pd.read_csv(folder / "comparison.csv")["images"]) == {20}
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                             artifact_path="tflite/comparison.csv"))
    assert set(logged["images"]) == set(full["images"]) == {80}


def test_a_comparison_on_validation_goes_to_its_own_folder_and_leaves_the_test_one_and_the_run_alone(exported, capsys):
    run, folder, cfg = exported
    before = (folder / "comparison.csv").read_text()
    assert export_tflite.main(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(folder.parent),
                               "--representative", "10", "--split", "validation"]) == 0
    assert "(not logged to the run: validation)" in capsys.readouterr().out
    table = pd.read_csv(folder.parent / f"{folder.name}-validation" / "comparison.csv")
    assert "test/accuracy" not in table and (table["validation/accuracy"] >= 0.75).all()
    assert agreement("tflite", folder.parent / f"{folder.name}-validation").endswith(
        f"of {table['images'][0]} validation images ({folder.parent / f'{folder.name}-validation' / 'comparison.csv'})")
    assert set(table["images"]) == {int(load_splits(cfg.data).validation.cardinality())}
    assert table.loc[0, "validation/accuracy"] == pytest.approx(run.data.metrics["val/accuracy_best"])
    assert (folder / "comparison.csv").read_text() == before
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                             artifact_path="tflite/comparison.csv"))
    assert "test/accuracy" in logged
