"""ADD (Sauer et al. 2023) and LADD (Sauer et al. 2024): a student that samples in --student-steps
Euler steps learns from a distillation term and an adversarial one at once.

The sample judged. From noise the student takes Euler steps on its N-step grid, as `ditkit sample
--steps N` does; a step index i is drawn per sample, the first i steps run without gradient (the
student's own trajectory, so it learns where it samples), and its denoised estimate at step i (on the
linear path, one Euler step to t = 1) is the sample.

Distillation (ADD's): the sample re-noised at a uniform level s; the guided teacher's denoised estimate
there is the target of a squared error weighted by the signal's share a^2 / (a^2 + sigma^2) (ADD's
c(t) = alpha-bar_t), the teacher's output held fixed.

The two terms are weighed by their gradients on the sample (as VQGAN's adaptive weight, Esser et al.
2021, there on the last layer): the adversarial gradient is scaled to --adv-weight times the norm of
the distillation's. A fixed weight is at the mercy of the discriminator's confidence: measured on the
bundled teacher, the adversarial gradient of a plain sum was 170 to 600 times the distillation's
after 100 steps, and the student drew the discriminator's blind spots instead of clothes. Both
gradients are taken on the sample first (the feature network's backward runs once), and the student
backpropagates their weighed sum.

Adversarial: hinge losses; the discriminator is small heads (convolutions on the token grid, the class
entering by projection) on every block's output of a frozen DiT, read through forward hooks so that
the networks stay free of training code. add: that DiT's features of the clean sample (--disc-net, the
teacher by default: never a network that judges the results). ladd: the teacher's own features of the
sample re-noised at a logit-normal level (--adv-t-mean: negative reads finer detail at less noise), so
it works on latents as on pixels.
Real samples are the training batch; the approximated R1 penalty of APT (Lin et al. 2025),
r1 |D(x) - D(x + R1_SIGMA n)|^2 on them, stands in for R1's second backward. The discriminator takes
its own AdamW step inside the student's (on the same batch, before the student's loss is formed);
it and its optimizer are part of the training checkpoint, so --resume continues both exactly. For the
first --disc-warmup steps only the discriminator learns: a random one's gradients are noise that a
good student (--student-init) would take in as texture.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints import infer_config, load_model, read_checkpoint
from ..config import DiTConfig, DistillConfig
from ..objectives.common import expand_to, mean_flat
from ..utils.runs import bundled_model, find_checkpoint
from .teacher import Teacher, denoised, guided_velocity

R1_SIGMA = 0.05  # the approximated R1's perturbation of real samples (data in [-1, 1] or unit-variance latents)
HEAD_WIDTH = 64
LOG_NAME = "adversarial.csv"
LOG_COLUMNS = ("step", "d_loss", "d_real", "d_fake", "distill", "adv", "adv_scale")


# -- the feature network --------------------------------------------------------------------------
class FeatureNet:
    """A frozen DiT whose block outputs the discriminator reads; `clean_t` is the network time at
    which it reads a clean sample (None: ladd, which reads re-noised samples at their own time)."""

    def __init__(self, model, clean_t: float | None, time_scale: float):
        self.model, self.clean_t, self.time_scale = model, clean_t, time_scale
        c = model.config
        self.tokens = (c.input_size // c.patch_size) ** 2
        self.dims = [c.hidden_size] * c.depth

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each block's tokens for inputs x at flow times t (ignored where clean_t is set): (N, T, D) each."""
        feats: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, args, out: feats.append(out[:, -self.tokens :])) for b in self.model.blocks]
        t_net = torch.full_like(t, self.clean_t) if self.clean_t is not None else t * self.time_scale
        try:
            self.model(x, t_net, y)
        finally:
            for h in hooks:
                h.remove()
        return feats


def feature_net(cfg: DistillConfig, teacher: Teacher) -> FeatureNet:
    """What the discriminator reads: the teacher at a re-noised level (ladd), the teacher at t = 1 or
    --disc-net's DiT at its clean time (add); one sentence where --disc-net is missing or does not fit."""
    scale = teacher.objective.time_scale
    if cfg.method == "ladd":
        return FeatureNet(teacher.model, None, scale)
    if cfg.disc_net == "teacher":
        return FeatureNet(teacher.model, scale, scale)
    if not Path(cfg.disc_net).expanduser().exists() and bundled_model(cfg.disc_net) is None:
        raise ValueError(f"--disc-net {cfg.disc_net} does not exist; pass 'teacher', a DiT model folder, run folder or checkpoint, or a bundled model's name.")
    path = find_checkpoint(cfg.disc_net)
    try:
        ck = read_checkpoint(path)
        config = ck.config or infer_config(ck.state)
    except (ValueError, KeyError, RuntimeError):
        config = None
    if not isinstance(config, DiTConfig):
        raise ValueError(f"--disc-net {path} is not a class-conditional DiT; the discriminator reads a DiT's blocks, so pass a DiT checkpoint or 'teacher'.")
    c, tc = config, teacher.model.config
    if (c.in_channels, c.input_size) != (tc.in_channels, tc.input_size) or c.num_classes < tc.num_classes:
        raise ValueError(f"--disc-net {path} takes {c.in_channels}-channel {c.input_size}x{c.input_size} inputs of {c.num_classes} classes, but the student "
                         f"makes {tc.in_channels}-channel {tc.input_size}x{tc.input_size} ones of {tc.num_classes}; pass a DiT trained on the teacher's data, or 'teacher'.")  # fmt: skip
    objective = ck.meta.get("objective", {})
    clean = float(objective.get("time_scale", 1.0)) if objective.get("objective") == "flow" else 0.0  # flow: t = 1 is data; the paper's diffusion: t = 0
    return FeatureNet(load_model(ck).requires_grad_(False).eval(), clean, scale)


# -- the discriminator -----------------------------------------------------------------------------
class Head(nn.Module):
    """One block's tokens -> a logit per token; the class enters by projection (Miyato & Koyama 2018)."""

    def __init__(self, dim: int, num_classes: int, width: int = HEAD_WIDTH):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), nn.GroupNorm(8, width), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2))  # fmt: skip
        self.out = nn.Conv2d(width, 1, 1)
        self.embed = nn.Embedding(num_classes, width)

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = f.shape
        side = math.isqrt(tokens)
        h = self.body(f.transpose(1, 2).reshape(n, dim, side, side))  # (N, W, s, s)
        proj = (self.embed(y)[:, :, None, None] * h).sum(1, keepdim=True) / math.sqrt(h.shape[1])  # (N, 1, s, s)
        return (self.out(h) + proj).flatten(1)  # (N, s*s)


class Discriminator(nn.Module):
    """A head on each block's features; the logits of all heads side by side."""

    def __init__(self, dims: list[int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(Head(d, num_classes) for d in dims)

    def forward(self, feats: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f, y) for h, f in zip(self.heads, feats)], dim=1)  # (N, blocks * T)


# -- the student's sample and the method -----------------------------------------------------------
def student_sample(model, flow, z: torch.Tensor, y: torch.Tensor, i: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The student's denoised estimate at step i (per sample) of its Euler steps on `grid` from noise z:
    the first i steps without gradient, the last with it. At i = steps - 1 (linear path) it is the
    sample of `ditkit sample --sampler euler --steps N`."""
    with torch.no_grad():  # the student's own trajectory: at step k the rows with i > k move on
        for k in range(len(grid) - 2):
            v = flow.velocity(model, z, grid[k].expand(len(z)), y=y).float()
            z = torch.where(expand_to(i > k, z), z + (grid[k + 1] - grid[k]) * v, z)
    t = grid[i]
    return denoised(flow, z, flow.velocity(model, z, t, y=y).float(), t)


class Adversarial:
    """The adversarial side of a Distillation task: the discriminator, its optimizer, the student's
    loss, and RUN/adversarial.csv (the discriminator's losses and logits at the trainer's log steps)."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, scale: float, interval, time_shift: float):
        self.cfg, self.teacher = cfg, teacher
        self.scale, self.interval, self.time_shift = scale, interval, time_shift
        self.features = feature_net(cfg, teacher)
        self.disc: Discriminator | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.stats, self.count, self.logged_to = None, 0, None

    def build(self, trainer) -> None:
        """The discriminator on the trainer's device: the same initial weights on every rank and after
        any code that ran before (its own seed), AdamW with GAN betas."""
        self.features.model.to(trainer.d.device)
        if self.disc is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer.cfg.global_seed + 1)
            self.disc = Discriminator(self.features.dims, self.teacher.model.config.num_classes)
        self.disc.to(trainer.d.device)
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=self.cfg.disc_lr or self.cfg.lr, betas=(0.0, 0.99), weight_decay=0.0)

    def state(self) -> dict:
        return {"discriminator": self.disc.state_dict(), "disc_opt": self.opt.state_dict()}

    def load_state(self, trainer, ck: dict) -> None:
        self.build(trainer)
        self.disc.load_state_dict(ck["discriminator"])
        self.opt.load_state_dict(ck["disc_opt"])
        self.logged_to = ck["step"]  # adversarial.csv keeps its rows up to here

    def read(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The feature network's view of samples x: as they are (add), or re-noised to t (ladd)."""
        if self.features.clean_t is None:
            x, _ = self.teacher.objective.interpolate(x, noise, t)
        return self.features(x, t, y)

    def loss(self, trainer, x, y, g, n, shape, mine) -> torch.Tensor:
        flow, dev, steps = trainer.objective, x.device, self.cfg.student_steps
        draw = lambda: torch.randn((n, *shape), generator=g, device=dev)[mine]  # noqa: E731
        i = torch.randint(steps, (n,), generator=g, device=dev)[mine]
        z, noise_distill, noise_fake, noise_real, noise_r1 = draw(), draw(), draw(), draw(), draw()
        s = torch.rand(n, generator=g, device=dev)[mine]  # the distillation's re-noising level
        t_adv = 1 - torch.sigmoid(self.cfg.adv_t_mean + torch.randn(n, generator=g, device=dev))[mine]  # ladd's levels (logit-normal)
        grid = flow.time_grid(steps, shift=self.time_shift, device=dev)  # (steps + 1,)
        warmup = trainer.step < self.cfg.disc_warmup  # only the discriminator learns: the student waits for a judge that is not random
        with torch.set_grad_enabled(not warmup):
            fake = student_sample(trainer.net, flow, z, y, i, grid)  # (N, C, H, W)
        sample = fake.detach().requires_grad_(not warmup)  # both terms' gradients are taken here first, then weighed

        f_fake = self.read(sample, noise_fake, t_adv, y)
        with torch.no_grad():
            f_real = self.read(x, noise_real, t_adv, y)
            f_near = self.read(x + R1_SIGMA * noise_r1, noise_real, t_adv, y)
        d_loss, d_real, d_fake = self.disc_step(trainer, f_real, f_near, [f.detach() for f in f_fake], y)
        if warmup:
            self.record(torch.stack([d_loss, d_real, d_fake, *torch.zeros(3, device=dev)]))
            return torch.zeros((), device=dev, requires_grad=True)  # no gradient for the student: AdamW leaves it as it is

        xs, _ = flow.interpolate(sample.detach(), noise_distill, s)
        with torch.no_grad():
            target = denoised(flow, xs, guided_velocity(self.teacher.model, flow, xs, s, y, self.scale, self.interval).float(), s)
        a, sigma, _, _ = flow.alpha_sigma(s)
        distill = (a**2 / (a**2 + sigma**2) * mean_flat((sample - target) ** 2)).mean()
        adv = -self.disc(f_fake, y).float().mean()  # the discriminator is frozen here: only the student learns from it
        g_distill, g_adv = (torch.autograd.grad(term, sample)[0] for term in (distill, adv))
        weight = self.cfg.adv_weight * g_distill.norm() / (g_adv.norm() + 1e-12)  # the adversarial gradient's norm: adv_weight times the distillation's
        surrogate = (fake * (g_distill + weight * g_adv)).sum()  # its gradient through the student is the weighed sum of both
        self.record(torch.stack([d_loss, d_real, d_fake, distill.detach(), adv.detach(), weight]))
        return surrogate - surrogate.detach() + (distill + weight * adv).detach()  # logged: the weighed loss

    def record(self, stats: torch.Tensor) -> None:
        self.stats, self.count = (stats if self.stats is None else self.stats + stats), self.count + 1

    def disc_step(self, trainer, f_real, f_near, f_fake, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One AdamW step of the discriminator on hinge losses and the approximated R1; (its loss, the
        mean logits of real and generated samples), detached."""
        self.disc.requires_grad_(True)
        real, near, fake = (self.disc(f, y).float() for f in (f_real, f_near, f_fake))
        loss = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean() + self.cfg.r1_weight * ((real - near) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if trainer.d.world > 1:  # data parallel by hand: the heads are small and outside DDP
            for p in self.disc.parameters():
                dist.all_reduce(p.grad)
                p.grad /= trainer.d.world
        self.opt.step()
        self.disc.requires_grad_(False)
        return loss.detach(), real.detach().mean(), fake.detach().mean()

    def after_step(self, trainer) -> None:
        """At the trainer's log steps, the means since the last one into RUN/adversarial.csv."""
        step, every = trainer.step + 1, trainer.cfg.log_every
        if step % every and step != trainer.total_steps:
            return
        values = (self.stats / self.count).tolist()
        self.stats, self.count = None, 0
        if trainer.d.main:
            write_log(trainer.exp_dir / LOG_NAME, step, values, self.logged_to)
            self.logged_to = None


def write_log(path: Path, step: int, values: list[float], keep_to: int | None) -> None:
    """A row of adversarial.csv; a resumed run first drops the rows after the step it resumed at."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        if keep_to is not None:
            rows = [r for r in rows if len(r) == len(LOG_COLUMNS) and int(r[0]) <= keep_to]
    rows.append([step, *(f"{v:.5f}" for v in values)])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([LOG_COLUMNS, *rows])
