"""Training and data that stay honest (issue 28, items 14-18 and dpo's half of 7): one process at a
time in a run folder, a full disk and a NaN stop that say what is on disk, image folders whose
symlinks loop, 16-bit PNGs, null captions, the resume rules train and distill share, and dpo on a
text-to-image model refused in one sentence."""

import errno
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.config import DistillConfig, DPOConfig, TrainConfig
from ditkit.data import build_dataset
from ditkit.text.captions import build_captioned_dataset
from ditkit.train import Trainer
from ditkit.utils import io as ditkit_io
from ditkit.utils.io import read_pt
from ditkit.utils.runs import latest_checkpoint

TINY = dict(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=1, global_batch_size=8)


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "results_dir": str(tmp_path / "results"), **kw})


def one_sentence(text: str) -> str:
    assert "\n" not in text.strip() and text.strip().endswith("."), text
    return text


# -- 14: one process at a time in a run folder --------------------------------------------------


def test_a_second_resume_of_a_running_run_is_refused(tmp_path, one_thread):
    exp = Trainer(cfg(tmp_path, max_steps=2)).run()
    first = Trainer(cfg(tmp_path, max_steps=4, resume="latest"))  # holds the run from here to the end of run()
    with pytest.raises(RuntimeError) as e:
        Trainer(cfg(tmp_path, max_steps=4, resume=str(exp)))
    assert str(exp) in one_sentence(str(e.value)) and "in use" in str(e.value)
    first.run()
    assert Trainer(cfg(tmp_path, max_steps=5, resume="latest")).run() == exp  # released at the end
    rows = [line.split(",")[0] for line in (exp / "log.csv").read_text().splitlines()[1:]]
    assert rows == ["1", "2", "3", "4", "5"]


def test_the_lock_is_released_when_a_run_fails(tmp_path, one_thread):
    trainer = Trainer(cfg(tmp_path, max_steps=2))
    trainer.train_step = lambda x, y: torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError):
        trainer.run()
    from ditkit.utils.runs import lock_run

    lock_run(trainer.exp_dir).close()  # free again


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    import ditkit
    from conftest import randomize_weights

    from ditkit.checkpoints import save_pretrained
    from ditkit.config import ObjectiveConfig

    torch.manual_seed(0)
    m = randomize_weights(ditkit.DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10, learn_sigma=False))
    folder = tmp_path_factory.mktemp("teacher") / "model"
    sampling = {"sampler": "euler", "num_sampling_steps": 2, "cfg_scale": 2.0}
    return save_pretrained(m, m.config, folder, extra={"objective": ObjectiveConfig(objective="flow").to_dict(), "data": "digits", "sampling": sampling})


def distill_cfg(tmp_path, teacher, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), results_dir=str(tmp_path / "results"), global_batch_size=8, num_workers=0, log_every=1, device="cpu", max_steps=2)
    return DistillConfig(**{**base, **kw})


def test_distill_holds_its_run_folder_too(tmp_path, flow_teacher, one_thread):
    from ditkit.distill import Distiller

    run = Distiller(distill_cfg(tmp_path, flow_teacher)).run()
    first = Distiller(DistillConfig(resume=str(run), results_dir=str(tmp_path / "results"), device="cpu", num_workers=0))
    with pytest.raises(RuntimeError, match="in use"):
        Distiller(DistillConfig(resume=str(run), results_dir=str(tmp_path / "results"), device="cpu", num_workers=0))
    first.run()


# -- 15, 16: a full disk and a NaN say what is on disk ------------------------------------------


class FullDisk(io.FileIO):
    """A file on a disk that fills after `room` bytes: its writes raise ENOSPC, as the kernel's do."""

    room = 2000

    def write(self, b):
        if self.tell() + len(memoryview(b)) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_a_disk_that_fills_inside_torch_save_gives_the_promised_sentence(tmp_path, monkeypatch, capsys):
    """torch.save turns the write error of its file into "unexpected pos": the sentence must still come."""
    results = tmp_path / "results"
    flags = ["train", "--data-path", "digits", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
             "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--device", "cpu"]  # fmt: skip
    assert main([*flags, "--max-steps", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(ditkit_io, "open", lambda path, mode="r", *a, **k: FullDisk(path, mode) if mode == "wb" else open(path, mode, *a, **k), raising=False)
    assert main([*flags, "--max-steps", "4", "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    exp = results / "000-DiT-S-2"
    assert "unexpected pos" not in err and f"no space left on {exp / 'checkpoints'} while writing 0000004.pt" in err
    assert f"the last complete checkpoint {exp / 'checkpoints' / '0000002.pt'} is intact" in err
    assert read_pt(exp / "checkpoints" / "0000002.pt")["step"] == 2 and not list(exp.rglob("*.tmp"))


@pytest.mark.parametrize("nan_at, kept", [(1, None), (3, "0000002.pt")])
def test_the_nan_stop_names_what_is_on_disk(tmp_path, one_thread, nan_at, kept):
    trainer = Trainer(cfg(tmp_path, max_steps=6, ckpt_every=2, log_every=1))
    real = trainer.train_step
    trainer.train_step = lambda x, y: real(x, y) * (float("nan") if trainer.step + 1 >= nan_at else 1.0)
    with pytest.raises(FloatingPointError) as e:
        trainer.run()
    text = one_sentence(str(e.value))
    if kept:
        assert str(trainer.exp_dir / "checkpoints" / kept) in text and f"--resume {trainer.exp_dir}" in text
    else:
        assert "no checkpoint" in text and "--resume" not in text and "kept in" not in text


# -- 17: image folders and captions ------------------------------------------------------------


def gray(path, value, bits=8):
    arr = np.full((8, 8), value * (257 if bits == 16 else 1), np.uint16 if bits == 16 else np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_a_symlink_loop_does_not_multiply_a_dataset(tmp_path):
    for i in range(4):
        gray(tmp_path / "data" / "cls" / f"{i}.png", 10 * i)
    (tmp_path / "data" / "cls" / "loop").symlink_to(".")
    (tmp_path / "data" / "cls" / "up").symlink_to("..")
    ds = build_dataset(tmp_path / "data", image_size=8, channels=1)
    assert len(ds) == 4 and ds.num_classes == 1
    for i in range(4):
        (tmp_path / "data" / "cls" / f"{i}.txt").write_text(f"a picture {i}")
    assert len(build_captioned_dataset(tmp_path / "data", image_size=8)) == 4


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_gray_pngs_are_scaled_not_saturated(tmp_path, channels):
    gray(tmp_path / "data" / "a" / "x.png", 128, bits=16)
    gray(tmp_path / "data" / "b" / "y.png", 128, bits=8)
    ds = build_dataset(tmp_path / "data", image_size=8, channels=channels, flip=False)
    sixteen, eight = ds[0][0], ds[1][0]
    assert torch.equal(sixteen, eight) and abs(sixteen.mean().item() - (128 / 255 * 2 - 1)) < 1e-6


def test_null_or_empty_captions_are_skipped_with_a_count(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(5):
        gray(root / f"{i}.png", 20 * i)
    rows = [{"file_name": "0.png", "text": "a coat"}, {"file_name": "1.png", "text": None}, {"file_name": "2.png", "text": "  "}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "3.txt").write_text("")
    (root / "4.txt").write_text("a bag")
    ds = build_captioned_dataset(root, image_size=8)
    assert len(ds) == 2 and ds.captions == ("", "a bag", "a coat") and "None" not in ds.captions
    err = capsys.readouterr().err
    assert "skipping 3 of 5 images" in err and "empty or null caption" in err
    (root / "4.txt").write_text("")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": None}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="none of the 5 images .* has a caption"):
        build_captioned_dataset(root, image_size=8)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": 5}) + "\n")
    with pytest.raises(ValueError, match="line 1 of .*metadata.jsonl"):
        build_captioned_dataset(root, image_size=8)


# -- 18: the resume rules of train and distill -------------------------------------------------


def test_distill_resume_takes_a_larger_max_steps_as_train_does(tmp_path, flow_teacher, one_thread, capsys):
    from ditkit.distill import Distiller

    run = Distiller(distill_cfg(tmp_path, flow_teacher, max_steps=2)).run()
    resumed = Distiller(DistillConfig(resume="latest", max_steps=4, results_dir=str(tmp_path / "results"), device="cpu", num_workers=0))
    assert resumed.run() == run and read_pt(latest_checkpoint(run.parent))["step"] == 4
    capsys.readouterr()
    Distiller(DistillConfig(resume="latest", max_steps=4, results_dir=str(tmp_path / "results"), device="cpu", num_workers=0)).run()
    said = capsys.readouterr().out
    assert "already at step 4 of 4; pass a larger --max-steps" in said and "--epochs" not in said


def test_progressive_distill_keeps_its_phases_on_resume(tmp_path, flow_teacher, one_thread):
    from ditkit.distill import Distiller

    Distiller(distill_cfg(tmp_path, flow_teacher, method="progressive", start_steps=2, max_steps=2)).run()
    with pytest.raises(ValueError) as e:
        Distiller(DistillConfig(resume="latest", max_steps=4, results_dir=str(tmp_path / "results"), device="cpu"))
    assert "phases" in one_sentence(str(e.value)) and "--max-steps 4" in str(e.value)


def test_a_resume_refusal_shows_the_runs_effective_values(tmp_path, one_thread):
    exp = Trainer(TrainConfig(**{**TINY, "depth": None, "results_dir": str(tmp_path / "r"), "max_steps": 1})).run()
    with pytest.raises(ValueError) as e:
        Trainer(TrainConfig(**{**TINY, "depth": 4, "resume": str(exp), "results_dir": str(tmp_path / "r")}))
    assert "--depth 4 (the run's: 12)" in str(e.value) and "None" not in str(e.value)


# -- 7 (dpo's half): a text-to-image model is refused in one sentence ----------------------------


def test_dpo_refuses_a_text_to_image_model_in_one_sentence(tmp_path, capsys):
    from ditkit.dpo import run_dpo

    with pytest.raises(ValueError) as e:
        run_dpo(DPOConfig(ckpt="fashion-mnist-text", out=str(tmp_path / "dpo"), device="cpu", samples_per_class=2, steps=1, eval_samples=0))
    assert "text-to-image" in one_sentence(str(e.value)) and not (tmp_path / "dpo").exists()
