"""`ditkit eval` reports what can be computed: accuracy from any number of labelled samples, a
Fréchet distance only past its minimum (saying so), nothing between images of different sizes;
--metrics names the metrics, and then one that cannot be computed is an error."""

import json

import numpy as np
import pytest

from ditkit.cli import main
from ditkit.eval import npz

TRAIN_300 = "fashion-mnist-train:300"


def eval_json(capsys, tmp_path, *argv) -> dict:
    assert main(["eval", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def eval_error(capsys, tmp_path, *argv) -> str:
    assert main(["eval", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditkit eval: error: ")
    return lines[0]


def test_accuracy_from_a_few_samples_without_a_reference(tmp_path, capsys):
    result = eval_json(capsys, tmp_path, "--samples", TRAIN_300, "--metrics", "accuracy")
    assert list(result["metrics"]) == ["accuracy"] and result["metrics"]["accuracy"] > 0.85  # real images
    assert (result["ref"], result["num_ref"], result["skipped"]) == (None, 0, [])
    assert "--ref is required" in eval_error(capsys, tmp_path, "--samples", TRAIN_300)


def test_fd_below_its_minimum_is_skipped_or_refused(tmp_path, capsys):
    result = eval_json(capsys, tmp_path, "--samples", TRAIN_300, "--ref", "fashion-mnist:2000")
    assert list(result["metrics"]) == ["accuracy"] and result["metrics"]["accuracy"] > 0.85
    assert any(s.startswith("FD-EffNet needs at least 1281 samples") and "got 300" in s for s in result["skipped"])
    assert any(s.startswith("FID, sFID, IS, precision and recall need pt_inception") for s in result["skipped"])
    assert "FD-EffNet needs at least 1281 samples" in eval_error(capsys, tmp_path, "--samples", TRAIN_300, "--ref", "fashion-mnist:2000", "--metrics", "FD-EffNet")
    assert "IS needs pt_inception" in eval_error(capsys, tmp_path, "--samples", TRAIN_300, "--ref", "fashion-mnist:2000", "--metrics", "IS")


def test_images_of_other_sizes_are_not_compared(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = npz.save_npz(tmp_path / "rgb.npz", arr_0=rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8))
    err = eval_error(capsys, tmp_path, "--samples", str(rgb), "--ref", "fashion-mnist:50")
    assert "none of the metrics can be computed" in err and "accuracy needs the samples' labels" in err
    assert "FD-EffNet, FID, sFID, precision and recall would compare 64x64x3 samples with 32x32x1 reference images" in err
    err = eval_error(capsys, tmp_path, "--samples", str(rgb), "--ref", "fashion-mnist:50", "--metrics", "FD-EffNet")
    assert err.endswith("FD-EffNet would compare 64x64x3 samples with 32x32x1 reference images, which measures the resizing, "
                        "not the model; sample at 32x32x1 or pass a reference of 64x64x3.")  # fmt: skip
    # Labelled 32x32x1 samples against an RGB reference: the accuracy is still reported.
    result = eval_json(capsys, tmp_path, "--samples", TRAIN_300, "--ref", str(rgb))
    assert list(result["metrics"]) == ["accuracy"]
    assert any("would compare 32x32x1 samples with 64x64x3 reference images" in s for s in result["skipped"])


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--accuracy" not in text
    assert ("--metrics [METRICS ...] metrics to report: FD-EffNet, accuracy, FID, sFID, IS, precision, recall; for clips FD-EffNet (per frame), "
            "accuracy (per clip), consistency, motion, FVD (default: every one that can be computed)") in text
