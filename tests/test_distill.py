"""`ditkit distill` on tiny flow teachers: the guidance-scale input (keys, zero start, one pass per
step, its range), each method's loss going down, exact resume, the model folders a run writes and
what they record, the CLI end to end, and the sentences for teachers and settings it cannot take."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import load_reference, randomize_weights, rel

import ditkit
from ditkit import train
from ditkit.checkpoints import read_pt, save_pretrained
from ditkit.cli import main
from ditkit.config import DistillConfig, ObjectiveConfig, SamplingOptions
from ditkit.distill import Distiller, guided_velocity, ode_step
from ditkit.pipeline import load_pipeline
from ditkit.utils.runs import latest_checkpoint

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False,
            mlp="swiglu", norm="rmsnorm", qk_norm=True, pos_embed="rope")  # fmt: skip
TEACHER_SAMPLING = {"sampler": "heun2", "num_sampling_steps": 5, "cfg_scale": 2.0, "cfg_interval": [0.1, 1.0]}
METHODS = ("guidance", "progressive", "reflow")


def tiny_teacher(**kw) -> ditkit.DiT:
    torch.manual_seed(0)
    return randomize_weights(ditkit.DiT(**{**TINY, **kw}), std=0.2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny flow teacher saved as ditkit train saves one: its objective, sampling and data (digits, 8x8x1, 10 classes)."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    m = tiny_teacher()
    save_pretrained(m, m.config, folder, extra={"objective": ObjectiveConfig(objective="flow").to_dict(), "data": "digits", "sampling": TEACHER_SAMPLING})
    return folder


def distill_cfg(tmp_path, teacher_dir, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher_dir), results_dir=str(tmp_path / "results"), global_batch_size=16, num_workers=0, log_every=1,
                device="cpu", reflow_pairs=16, start_steps=4)  # fmt: skip
    return DistillConfig(**{**base, **kw})


# -- the guidance-scale input -------------------------------------------------------------------
def test_defaults_keep_the_official_keys_and_outputs(one_thread):
    meta, model, io = load_reference("official")  # strict=True load: the same keys as the official weights
    assert not model.config.cfg_embed and not any(k.startswith("w_embedder") for k in model.state_dict())
    with torch.no_grad():
        assert rel(model(io["forward.x"], io["forward.t"], io["forward.y"]), io["forward.out"]) < 1e-5
    with pytest.raises(ValueError, match="does not take the guidance scale"):
        model(io["forward.x"], io["forward.t"], io["forward.y"], cfg_scale=2.0)


def test_zero_initialised_guidance_embedding_starts_as_the_teacher(one_thread):
    teacher = tiny_teacher()
    student = ditkit.DiT(replace(teacher.config, cfg_embed=True, cfg_range=(1.0, 4.0))).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert sorted(missing) == [f"w_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")] and not unexpected
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = teacher(x, t, y)
        for w in (1.0, 3.0, torch.tensor([1.0, 2.0, 3.0, 4.0])):
            assert torch.equal(student(x, t, y, cfg_scale=w), ref)
        torch.nn.init.normal_(student.w_embedder.mlp[2].weight, std=0.1)  # once trained, the scale matters
        assert not torch.allclose(student(x, t, y, cfg_scale=1.0), student(x, t, y, cfg_scale=3.0))


def test_guidance_student_samples_in_one_pass_with_the_interval(one_thread):
    teacher = tiny_teacher()
    student = ditkit.DiT(replace(teacher.config, cfg_embed=True, cfg_range=(1.0, 4.0))).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    flow, noise, y = ditkit.FlowMatching(), torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    calls = {}
    for name, m in (("teacher", teacher), ("student", student)):
        seen = calls[name] = []
        hook = m.register_forward_pre_hook(lambda mod, args, kw, seen=seen: seen.append((len(args[0]), kw.get("cfg_scale"))), with_kwargs=True)
        ditkit.sample(m, flow, noise, y, sampler="euler", steps=4, cfg_scale=2.0, cfg_interval=(0.3, 1.0))
        hook.remove()
    # Euler times 0, .25, .5, .75: unguided (one pass of N) below 0.3 for both; guided above it, the teacher in 2N rows
    assert calls["teacher"] == [(3, None), (3, None), (6, None), (6, None)]
    assert calls["student"] == [(3, 1.0), (3, 1.0), (3, 2.0), (3, 2.0)]
    with pytest.raises(ValueError, match=r"distilled for guidance scales 1 to 4, not 5; pass a --cfg-scale in that range\."):
        ditkit.sample(student, flow, noise, y, sampler="euler", steps=2, cfg_scale=5.0)


def test_guided_velocity_matches_the_sampler_guidance(one_thread):
    """The per-sample guided velocity of the distillation targets equals the samplers' cfg_model at one t."""
    teacher, flow = tiny_teacher(), ditkit.FlowMatching()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    guided = ditkit.cfg_model(lambda x, t, y: teacher(x, t, y), 3.0)
    for t in (0.05, 0.5):
        tt = torch.full((3,), t)
        with torch.no_grad():
            ours = guided_velocity(teacher, flow, x, tt, y, 3.0, interval=(0.1, 1.0))
            ref = guided(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, 10)]))[:3] if t >= 0.1 else teacher(x, tt, y)
        assert torch.allclose(ours, ref, atol=1e-5), t  # outside the interval: cond + 1 * (cond - null) = cond, to round-off


# -- the methods -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_loss(tmp_path, teacher_dir, method, one_thread):
    """Ten steps on one batch (the same randomness: the step counter held) at a high learning rate
    halve each method's loss from where the teacher's weights start it."""
    d = Distiller(distill_cfg(tmp_path, teacher_dir, method=method, lr=3e-4))
    if method == "reflow":
        d.pairs = d.make_pairs()
        assert d.pairs[1].shape == (16, 1, 8, 8) and d.pairs[1].abs().max() <= 1  # teacher samples, clipped like the pipeline's
    x, y = next(iter(d.loader()[0]))
    d.step = 1  # progressive: phase 0, the guided teacher with Heun (8 steps over 4 phases of 2)
    losses = [d.train_step(x, y).item() for _ in range(10)]
    assert losses[0] > 1e-4 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", METHODS)
def test_resume_continues_exactly(tmp_path, teacher_dir, method, one_thread, monkeypatch):
    """Six steps straight equal three steps, a stop, and a bare --resume: weights, EMA, AdamW and the
    progressive phase teacher bit for bit; reflow's pairs are read back, not made again."""
    common = dict(method=method, max_steps=6, ckpt_every=100)
    straight = Distiller(distill_cfg(tmp_path / "a", teacher_dir, **common)).run()
    monkeypatch.setattr(train.Trainer, "_out_of_time", lambda self, start: self.step == 3)
    Distiller(distill_cfg(tmp_path / "b", teacher_dir, **common)).run()
    monkeypatch.undo()
    run = tmp_path / "b" / "results" / f"000-distill-{method}"
    assert latest_checkpoint(run.parent).name == "0000003.pt"
    if method == "reflow":
        monkeypatch.setattr("ditkit.distill.task.sample", lambda *a, **k: pytest.fail("reflow pairs made again on resume"))
    d = Distiller(DistillConfig(resume=str(run), results_dir=str(tmp_path / "b" / "results"), device="cpu", num_workers=0))
    assert (d.step, d.exp_dir, d.phase) == (3, run, 1 if method == "progressive" else 0)
    d.run()
    a, b = read_pt(latest_checkpoint(straight.parent)), read_pt(latest_checkpoint(run.parent))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "phase_teacher"):
        if a[key] is None:
            assert b[key] is None and method != "progressive"
            continue
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["opt"]["state"][0]["exp_avg"].equal(b["opt"]["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="--method"):
        other = "progressive" if method != "progressive" else "reflow"  # not the default: a default counts as not given
        Distiller(DistillConfig(resume=str(run), method=other, results_dir=str(tmp_path / "b" / "results"), device="cpu"))


def test_guidance_run_records_the_teachers_sampling_at_half_the_passes(tmp_path, teacher_dir, one_thread):
    out = Distiller(distill_cfg(tmp_path, teacher_dir, method="guidance", max_steps=2)).run()
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["sampling"] == TEACHER_SAMPLING and saved["cfg_embed"] is True and saved["cfg_range"] == [1.0, 4.0]
    assert saved["distilled"]["method"] == "guidance" and saved["objective"]["objective"] == "flow"
    pipe = load_pipeline(SamplingOptions(ckpt=str(out / "model"), device="cpu"))
    rows = []
    pipe.model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    images = pipe.images(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and rows == [3] * 10  # heun2, 5 steps: 10 passes of N, none of 2N
    with pytest.raises(ValueError, match="distilled for guidance scales 1 to 4, not 6"):
        load_pipeline(SamplingOptions(ckpt=str(out / "model"), cfg_scale=6.0, device="cpu"))


def test_cli_progressive_end_to_end(tmp_path, teacher_dir, one_thread, capsys):
    """ditkit distill through the command line: phases 4 -> 2 -> 1 steps, a model folder for each,
    model/ the 1-step student with guidance baked in; ditkit sample takes it as it is."""
    results = tmp_path / "results"
    rc = main(["distill", "--teacher", str(teacher_dir), "--method", "progressive", "--start-steps", "4", "--student-steps", "1",
               "--max-steps", "6", "--global-batch-size", "16", "--num-workers", "0", "--results-dir", str(results), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    run = results / "000-distill-progressive"
    for steps in (4, 2, 1):
        saved = json.loads((run / f"model-{steps}step" / "config.json").read_text())
        assert saved["sampling"] == {"sampler": "euler", "num_sampling_steps": steps, "cfg_scale": 1.0, "time_shift": 1.0}
    assert json.loads((run / "model" / "config.json").read_text())["sampling"]["num_sampling_steps"] == 1
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 6
    assert main(["sample", "--ckpt", str(run / "model"), "--classes", "0", "1", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "grid.png").exists()


def test_cli_reflow_end_to_end(tmp_path, teacher_dir, one_thread):
    results = tmp_path / "results"
    rc = main(["distill", "--teacher", str(teacher_dir), "--method", "reflow", "--student-steps", "2", "--reflow-pairs", "20",
               "--max-steps", "3", "--global-batch-size", "16", "--num-workers", "0", "--results-dir", str(results), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    run = results / "000-distill-reflow"
    pairs = ditkit.distill.task.load_file(str(run / "reflow_pairs.safetensors"))
    assert pairs["noise"].shape == pairs["data"].shape == (20, 1, 8, 8) and pairs["labels"].tolist() == [i % 10 for i in range(20)]
    assert json.loads((run / "model" / "config.json").read_text())["sampling"]["num_sampling_steps"] == 2


# -- what it cannot take ------------------------------------------------------------------------
def one_sentence(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ditkit distill: error: ") and err.endswith("."), err
    return err


def test_a_gaussian_teacher_is_one_sentence(tmp_path, capsys):
    err = one_sentence(capsys, ["distill", "--teacher", "fashion-mnist-diffusion", "--results-dir", str(tmp_path)])
    assert "is a gaussian diffusion model, and ditkit distill needs a flow-matching teacher" in err
    assert not (tmp_path / "000-distill-guidance").exists()


def test_bad_settings_are_one_sentence(tmp_path, teacher_dir, capsys):
    base = ["distill", "--teacher", str(teacher_dir), "--results-dir", str(tmp_path), "--device", "cpu"]
    assert "--teacher is required" in one_sentence(capsys, ["distill"])
    assert "--cfg-range takes two numbers LO <= 1 <= HI" in one_sentence(capsys, base + ["--cfg-range", "1.5", "3"])
    assert "not --student-steps 1 times a power of 2" in one_sentence(capsys, base + ["--method", "progressive", "--start-steps", "6"])
    err = one_sentence(capsys, base + ["--cfg-range", "1", "1.5"])
    assert "guidance scale 2 the student is to record lies outside --cfg-range 1 1.5" in err
    assert "does not exist and is not a named dataset" in one_sentence(capsys, base + ["--data-path", str(tmp_path / "nowhere")])
    assert not any(tmp_path.glob("*-distill-*"))  # no run folder for a run that never started


def test_out_of_range_scale_through_ditkit_sample(tmp_path, teacher_dir, one_thread, capsys):
    out = Distiller(distill_cfg(tmp_path, teacher_dir, method="guidance", max_steps=1)).run()
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(out / "model"), "--cfg-scale", "7", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ditkit sample: error: this model was distilled for guidance scales 1 to 4, not 7; pass a --cfg-scale in that range."


def test_flops_count_the_guidance_embedding(one_thread):
    from ditkit.flops import count_macs

    teacher = tiny_teacher()
    student = ditkit.DiT(replace(teacher.config, cfg_embed=True, cfg_range=(1.0, 4.0)))
    assert count_macs(student) - count_macs(teacher) == 256 * 32 + 32 * 32  # the w embedder's two Linears, one image


def test_progressive_teacher_steps_follow_the_samplers():
    """The phase-0 teacher steps as the teacher's sampler would: heun takes Euler on a step ending
    at t = 1 and Heun elsewhere (per sample), heun2 Heun everywhere; the same as ditkit.sample's."""
    flow = ditkit.FlowMatching()
    model = tiny_teacher(learn_sigma=False).eval()
    v = lambda z, s: flow.velocity(model, z, s, y=torch.zeros(len(z), dtype=torch.long))  # noqa: E731
    x, t0, t1 = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5]), torch.tensor([0.75, 1.0])
    with torch.no_grad():
        euler, heun2, heun = (ode_step(v, x, t0, t1, solver) for solver in ("euler", "heun2", "heun"))
        torch.testing.assert_close(heun[1], euler[1])
        torch.testing.assert_close(heun[0], heun2[0])
        assert (heun2[1] - euler[1]).abs().max() > 1e-3
        for solver in ("heun", "heun2"):  # two steps of 0.5 from noise: what the sampler gives
            z = torch.randn(3, 1, 8, 8)
            ts = [torch.full((3,), s) for s in (0.0, 0.5, 1.0)]
            by_hand = ode_step(v, ode_step(v, z, ts[0], ts[1], solver), ts[1], ts[2], solver)
            torch.testing.assert_close(ditkit.sample(model, flow, z, torch.zeros(3, dtype=torch.long), sampler=solver, steps=2), by_hand)
