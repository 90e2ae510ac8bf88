"""`ditkit distill --method add / ladd` on tiny flow teachers: the student's sample is the Euler
sampler's, the feature network and the discriminator's shapes (hooks gone after a read), both losses
falling, exact resume of both networks and both optimizers, and a sentence for each bad input."""

import json

import pytest
import torch
from test_distill import distill_cfg, one_sentence, teacher_dir, tiny_teacher  # noqa: F401  (teacher_dir: the fixture)

import ditkit
from ditkit import train
from ditkit.checkpoints import read_pt, save_pretrained
from ditkit.config import DistillConfig, ObjectiveConfig
from ditkit.distill import Distiller
from ditkit.distill.adversarial import LOG_COLUMNS, LOG_NAME, Discriminator, FeatureNet, student_sample
from ditkit.utils.runs import latest_checkpoint


@pytest.mark.parametrize("steps", [1, 3])
def test_the_sample_judged_is_the_euler_samplers(steps, one_thread):
    """At the last step index the student's denoised estimate is `ditkit.sample`'s Euler sample; at
    earlier ones it is the denoised estimate where the sampler stands after i steps."""
    model, flow = tiny_teacher().eval(), ditkit.FlowMatching()
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    grid = flow.time_grid(steps)
    with torch.no_grad():
        ref = ditkit.sample(model, flow, z, y, sampler="euler", steps=steps)
        ours = student_sample(model, flow, z, y, torch.full((4,), steps - 1), grid)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        if steps > 1:  # after one step, at grid[1]: x + (1 - t) v
            x1 = z + grid[1] * model(z, torch.zeros(4), y)
            d = x1 + (1 - grid[1]) * model(x1, grid[1].expand(4), y)
            mixed = student_sample(model, flow, z, y, torch.tensor([1, 0, 1, steps - 1]), grid)
            torch.testing.assert_close(mixed[0], d[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mixed[1], (z + model(z, torch.zeros(4), y))[1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mixed[3], ref[3], atol=1e-5, rtol=1e-5)


def test_features_and_discriminator_shapes(one_thread):
    model = tiny_teacher().eval()
    feats = FeatureNet(model, None, 1.0)(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]))
    assert len(feats) == 2 and all(f.shape == (3, 4, 32) for f in feats)  # depth 2; (8 / 4)^2 tokens of width 32
    assert all(not b._forward_hooks for b in model.blocks)  # the network is left as it was
    disc = Discriminator([32, 32], num_classes=10)
    logits = disc(feats, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 8)
    assert not torch.equal(disc(feats, torch.tensor([3, 4, 5])), logits)  # conditioned on the class


def adversarial_stats(tmp_path, teacher_dir, method, steps=12, **kw) -> list[torch.Tensor]:
    """(d_loss, d_real, d_fake, distill, adv) of each of `steps` steps on one batch, the randomness held."""
    d = Distiller(distill_cfg(tmp_path, teacher_dir, method=method, lr=3e-4, log_every=1000, student_steps=2, **kw))
    d.trainer.task.prepare(d.trainer)
    adv = d.trainer.task.adversarial
    x, y = next(iter(d.loader()[0]))
    d.step = 1
    stats = []
    for _ in range(steps):
        d.train_step(x, y)
        stats.append(adv.stats / adv.count)
        adv.stats, adv.count = None, 0
    return stats


@pytest.mark.parametrize("method", ["add", "ladd"])
def test_both_losses_fall(tmp_path, teacher_dir, method, one_thread):  # noqa: F811
    """On one batch: the discriminator learns to tell the teacher's data from the tiny student's (its
    hinge loss falls, the logits part), and the student's distillation term falls (the adversarial
    term off); with the discriminator held (a negligible learning rate) the student learns to fool it."""
    stats = adversarial_stats(tmp_path / "a", teacher_dir, method, adv_weight=0.0)
    first, last = stats[0], stats[-1]
    assert 1.5 < first[0] <= 2.5 and last[0] < 0.75 * first[0], stats
    assert last[2] < first[2] - 0.1 and last[1] > first[1] + 0.1, stats
    assert last[3] < 0.8 * first[3], stats
    stats = adversarial_stats(tmp_path / "b", teacher_dir, method, adv_weight=10.0, disc_lr=1e-12)
    assert stats[-1][4] < stats[0][4] - 0.05, stats


@pytest.mark.parametrize("method", ["add", "ladd"])
def test_resume_continues_both_networks_exactly(tmp_path, teacher_dir, method, one_thread, monkeypatch):  # noqa: F811
    """Six steps straight equal three, a stop and a bare --resume: student, EMA, discriminator and both
    AdamW states bit for bit; adversarial.csv has a row per log step, none twice."""
    common = dict(method=method, max_steps=6, ckpt_every=100, log_every=2, student_steps=2)
    straight = Distiller(distill_cfg(tmp_path / "a", teacher_dir, **common)).run()
    monkeypatch.setattr(train.Trainer, "_out_of_time", lambda self, start: self.step == 3)
    Distiller(distill_cfg(tmp_path / "b", teacher_dir, **common)).run()
    monkeypatch.undo()
    run = tmp_path / "b" / "results" / f"000-distill-{method}"
    assert read_pt(latest_checkpoint(run.parent))["step"] == 3
    Distiller(DistillConfig(resume=str(run), results_dir=str(tmp_path / "b" / "results"), device="cpu", num_workers=0)).run()
    a, b = read_pt(latest_checkpoint(straight.parent)), read_pt(latest_checkpoint(run.parent))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "discriminator"):
        assert a[key].keys() == b[key].keys() and len(a[key]) > 0
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for key in ("opt", "disc_opt"):
        sa, sb = a[key]["state"], b[key]["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (key, i, k)
    logs = [(r / LOG_NAME).read_text().splitlines() for r in (straight, run)]
    assert logs[0][0] == logs[1][0] == ",".join(LOG_COLUMNS)
    assert [r.split(",")[0] for r in logs[0][1:]] == [r.split(",")[0] for r in logs[1][1:]] == ["2", "4", "6"]
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["sampling"] == {"sampler": "euler", "num_sampling_steps": 2, "cfg_scale": 1.0, "time_shift": 1.0}
    assert saved["distilled"]["method"] == method


def test_add_reads_another_dit_at_its_clean_time(tmp_path, teacher_dir, one_thread):  # noqa: F811
    """--disc-net: a Gaussian-diffusion DiT of the same input is read at t = 0, a flow one at t = 1."""
    folder = tmp_path / "gaussian"
    m = tiny_teacher(learn_sigma=True, hidden_size=48, depth=3, num_heads=3)
    save_pretrained(m, m.config, folder, extra={"objective": ObjectiveConfig(objective="gaussian").to_dict()})
    d = Distiller(distill_cfg(tmp_path, teacher_dir, method="add", disc_net=str(folder), max_steps=1))
    features = d.trainer.task.adversarial.features
    assert (features.clean_t, features.dims) == (0.0, [48] * 3)
    seen = []
    features.model.register_forward_pre_hook(lambda mod, args: seen.append(args[1].tolist()))
    d.run()
    assert seen and all(t == [0.0] * len(t) for t in seen)
    assert Distiller(distill_cfg(tmp_path, teacher_dir, method="add")).trainer.task.adversarial.features.clean_t == 1.0


# -- what it cannot take ------------------------------------------------------------------------
def test_bad_adversarial_input_is_one_sentence(tmp_path, teacher_dir, capsys):  # noqa: F811
    base = ["distill", "--teacher", str(teacher_dir), "--results-dir", str(tmp_path), "--device", "cpu", "--method", "add"]
    err = one_sentence(capsys, base + ["--disc-net", str(tmp_path / "nowhere")])
    assert "--disc-net" in err and "nowhere does not exist; pass 'teacher', a DiT model folder" in err
    assert "is not a class-conditional DiT; the discriminator reads a DiT's blocks" in one_sentence(
        capsys, base + ["--disc-net", str(ditkit.utils.runs.ASSETS / "fmnist_classifier.safetensors")]
    )
    err = one_sentence(capsys, base + ["--disc-net", "bundled"])  # 32x32 Fashion-MNIST against the teacher's 8x8 digits
    assert "takes 1-channel 32x32 inputs of 10 classes, but the student makes 1-channel 8x8 ones of 10" in err
    err = one_sentence(capsys, base[:-1] + ["ladd", "--disc-net", "bundled"])
    assert "--disc-net is the feature network of --method add's discriminator" in err and "ladd reads the teacher itself" in err
    err = one_sentence(capsys, ["distill", "--teacher", "fashion-mnist-diffusion", "--method", "add", "--results-dir", str(tmp_path)])
    assert "is a gaussian diffusion model, and ditkit distill needs a flow-matching teacher" in err
    assert not any(tmp_path.glob("*-distill-*"))


def test_student_init_starts_from_another_student(tmp_path, teacher_dir, capsys, one_thread):  # noqa: F811
    """--student-init: the student (and its EMA) start from that model's weights, recorded in model/;
    a model of another architecture is one sentence."""
    folder = tmp_path / "student"
    m = tiny_teacher()
    with torch.no_grad():
        m.final_layer.linear.bias.add_(0.5)  # a student that differs from the teacher
    save_pretrained(m, m.config, folder, extra={"objective": ObjectiveConfig(objective="flow").to_dict()})
    d = Distiller(distill_cfg(tmp_path, teacher_dir, method="ladd", student_init=str(folder), max_steps=1))
    for net in (d.trainer.model, d.trainer.ema):
        assert all(torch.equal(net.state_dict()[k], v) for k, v in m.state_dict().items())
    out = d.run()
    assert json.loads((out / "model" / "config.json").read_text())["distilled"]["student_init"] == str(folder)
    other = tmp_path / "other"
    m = tiny_teacher(hidden_size=48, num_heads=3)
    save_pretrained(m, m.config, other, extra={"objective": ObjectiveConfig(objective="flow").to_dict()})
    capsys.readouterr()
    err = one_sentence(capsys, ["distill", "--teacher", str(teacher_dir), "--method", "add", "--student-init", str(other), "--results-dir", str(tmp_path / "r")])
    assert f"--student-init {other} is not a DiT of the teacher's architecture (hidden_size 48, the teacher's 32; num_heads 3, the teacher's 2)" in err


def test_disc_warmup_trains_only_the_discriminator(tmp_path, teacher_dir, one_thread):  # noqa: F811
    """--disc-warmup 2: two steps leave the student and its EMA as they started, the discriminator moves;
    the third step moves the student."""
    d = Distiller(distill_cfg(tmp_path, teacher_dir, method="ladd", disc_warmup=2, log_every=1000, adv_t_mean=-1.0))
    d.trainer.task.prepare(d.trainer)
    adv = d.trainer.task.adversarial
    start = {k: v.clone() for k, v in d.trainer.model.state_dict().items()}
    disc = {k: v.clone() for k, v in adv.disc.state_dict().items()}
    x, y = next(iter(d.loader()[0]))
    for step in range(3):
        d.step = step
        d.train_step(x, y)
        same = all(torch.equal(v, d.trainer.model.state_dict()[k]) for k, v in start.items())
        assert same == (step < 2), step
        assert all(torch.equal(v, d.trainer.ema.state_dict()[k]) for k, v in start.items()) == (step < 2)
    assert not all(torch.equal(v, adv.disc.state_dict()[k]) for k, v in disc.items())
