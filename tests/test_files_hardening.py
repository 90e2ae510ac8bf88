"""Files ditkit reads are checked as flags are (issue 28, items 9-13): a recorded config.json,
sampling or objective, an adapter_config.json and its metadata go through the configs' validator
and end in one sentence naming the file and the field; a model beyond the machine is refused
before it is built; an adapter with settings ditkit never writes is refused; sample-npz never
overwrites an .npz that is not its own."""

import json
import time

import numpy as np
import pytest
import torch
from conftest import randomize_weights
from safetensors import safe_open

import ditkit
from ditkit.checkpoints import load_model, read_checkpoint, save_pretrained
from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.train import Trainer
from ditkit.utils.io import safetensors_save

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4, learn_sigma=False)
RECORDED = {"objective": {"objective": "flow"}, "sampling": {"sampler": "euler", "num_sampling_steps": 2, "cfg_scale": 1.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_weights(ditkit.DiT(**TINY))
    return save_pretrained(model, model.config, tmp_path_factory.mktemp("m") / "model", extra=RECORDED)


def tampered(src, dst, change) -> "Path":  # noqa: F821
    """A copy of the model folder `src` whose config.json is change(dict) (or the text change returns)."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    saved = json.loads((src / "config.json").read_text())
    new = change(saved)
    (dst / "config.json").write_text(new if isinstance(new, str) else json.dumps(saved if new is None else new))
    return dst


def one_sentence(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text.endswith(".") and len(text) < 400, text
    return text


# -- 9: a model beyond the machine is refused before it is built ---------------------------------


@pytest.mark.parametrize("field, value", [("depth", 10_000_000), ("hidden_size", 2**22), ("num_classes", 10**12), ("input_size", 100_000)])
def test_absurd_recorded_model_is_refused_before_it_is_built(model_dir, tmp_path, monkeypatch, field, value):
    def built(*a, **k):
        raise AssertionError("the network was built")

    monkeypatch.setattr(ditkit.checkpoints.DiT, "__init__", built)
    folder = tampered(model_dir, tmp_path / "m", lambda d: d.update({field: value}))
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load_model(folder)
    text = one_sentence(e.value)
    assert str(folder / "config.json") in text and f"{field} {value}" in text and "memory" in text
    assert time.perf_counter() - start < 5


def test_train_refuses_an_image_size_beyond_the_machine(tmp_path):
    cfg = TrainConfig(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0,
                      image_size=100_000, global_batch_size=4, results_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError) as e:
        Trainer(cfg)
    assert "--image-size 100000" in one_sentence(e.value) and "memory" in str(e.value)


# -- 10, 11: recorded settings go through the flags' validator, naming the file and the field ------


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: [1, 2], "a JSON object"),
        (lambda d: "not json", "not valid JSON"),
        (lambda d: d.update(objective="garbage"), "objective"),
        (lambda d: d.update(objective={"objective": "garbage"}), "objective.objective"),
        (lambda d: d.update(objective={"objective": "flow", "bogus": 1}), "objective.bogus"),
        (lambda d: d.update(hidden_size=1e9), "hidden_size"),
        (lambda d: d.update(depth="2"), "depth"),
        (lambda d: d.update(sampling=[1]), "sampling"),
        (lambda d: d.update(sampling={"sampler": "garbage"}), "sampling.sampler"),
        (lambda d: d.update(sampling={"num_sampling_steps": 10**9}), "sampling.num_sampling_steps"),
        (lambda d: d.update(sampling={"cfg_scale": "x"}), "sampling.cfg_scale"),
        (lambda d: d.update(text_encoder=5), "text_encoder"),
    ],
)  # fmt: skip
def test_malformed_config_json_is_one_sentence_naming_file_and_field(model_dir, tmp_path, change, field):
    folder = tampered(model_dir, tmp_path / "m", change)
    with pytest.raises(ValueError) as e:
        read_checkpoint(folder)
    text = one_sentence(e.value)
    assert str(folder / "config.json") in text and field in text
    assert "--" not in text.split(";")[0]  # a file's field, not a flag


def test_recorded_sampling_steps_past_the_cap_stop_sample(model_dir, tmp_path, capsys):
    folder = tampered(model_dir, tmp_path / "m", lambda d: d["sampling"].update(num_sampling_steps=10**9))
    assert main(["sample", "--ckpt", str(folder), "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "sampling.num_sampling_steps must be at most 10000, got 1000000000" in err and str(folder / "config.json") in err


def test_training_checkpoint_records_are_checked_too(model_dir, tmp_path):
    state = {"model": {}, "ema": load_model(model_dir).state_dict(), "model_config": {**TINY, "depth": -1}}
    torch.save(state, tmp_path / "ck.pt")
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "ck.pt")
    assert str(tmp_path / "ck.pt") in one_sentence(e.value) and "model_config.depth must be positive" in str(e.value)


# -- 11, 12: adapters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    from ditkit.lora import add_lora, save_adapter

    model = load_model(model_dir)
    add_lora(model, 2, base=str(model_dir))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a change the adapter makes
    return save_adapter(model, tmp_path_factory.mktemp("a") / "adapter", model.config)


def tampered_adapter(src, dst, change=None, meta=None):
    from ditkit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    dst.mkdir()
    saved = json.loads((src / ADAPTER_CONFIG).read_text())
    new = change(saved) if change else None
    (dst / ADAPTER_CONFIG).write_text(json.dumps(saved if new is None else new))
    with safe_open(str(src / ADAPTER_WEIGHTS), "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    safetensors_save(state, dst / ADAPTER_WEIGHTS, metadata={**metadata, **(meta or {})})
    return dst


@pytest.mark.parametrize(
    "change, meta, field",
    [
        (lambda d: [1], None, "a JSON object"),
        (None, {"ditkit_base_config": "[1, 2]"}, "ditkit_base_config"),
        (None, {"ditkit_base_config": "{"}, "ditkit_base_config"),
        (lambda d: d.update(modules_to_save=["final_layer"]), None, "modules_to_save"),
        (lambda d: d.update(target_modules=5), None, "target_modules"),
        (lambda d: d.update(target_modules=".*"), None, "target_modules"),
        (lambda d: d.update(target_modules=["nothing.here"]), None, "target_modules"),
        (lambda d: d.update(init_lora_weights="pissa"), None, "init_lora_weights"),
        (lambda d: d.update(use_dora=True), None, "use_dora"),
        (lambda d: d.update(r=0), None, "r must be positive"),
    ],
)  # fmt: skip
def test_malformed_or_foreign_adapter_is_one_sentence_naming_file_and_field(model_dir, adapter_dir, tmp_path, change, meta, field):
    from ditkit.lora import apply_adapter, read_adapter

    folder = tampered_adapter(adapter_dir, tmp_path / "a", change, meta)
    with pytest.raises(ValueError) as e:
        apply_adapter(load_model(model_dir), read_adapter(folder))
    text = one_sentence(e.value)
    assert str(folder) in text and field in text


def test_honest_adapter_still_loads_and_changes_the_output(model_dir, adapter_dir):
    from ditkit.lora import apply_adapter, read_adapter

    x, t, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7]), torch.tensor([0, 1])
    base = load_model(model_dir)
    tuned = apply_adapter(load_model(model_dir), read_adapter(adapter_dir))
    with torch.no_grad():
        assert (tuned(x, t, y) - base(x, t, y)).abs().max() > 1e-3


# -- 13: sample-npz never overwrites an .npz that is not its own ----------------------------------


def test_sample_npz_refuses_to_overwrite_an_existing_npz(model_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    np.savez(out, arr_0=np.zeros((1, 8, 8, 1), np.uint8))
    before = out.read_bytes()
    args = ["sample-npz", "--ckpt", str(model_dir), "--out", str(out), "--num-samples", "2", "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    out.unlink()
    assert main(args) == 0 and main(args) == 2  # its own finished output is not overwritten either
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)


def test_sample_npz_finishes_its_own_interrupted_join(model_dir, tmp_path, monkeypatch):
    """Killed after writing OUT but before removing its shards: the same command finishes; other settings are refused."""
    from ditkit import generate

    out = tmp_path / "s.npz"
    args = ["sample-npz", "--ckpt", str(model_dir), "--out", str(out), "--num-samples", "2", "--batch-size", "1", "--device", "cpu"]
    monkeypatch.setattr(generate.shutil, "rmtree", lambda *a, **k: None)  # the kill: the shards stay
    assert main(args) == 0
    monkeypatch.undo()
    first = np.load(out)["arr_0"]
    assert main(args[:-2] + ["--seed", "1", "--device", "cpu"]) == 2  # another seed: not its own output
    assert main(args) == 0 and np.array_equal(np.load(out)["arr_0"], first)
    assert not (tmp_path / ".s.npz.parts").exists()
