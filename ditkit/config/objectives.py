"""What a network is trained to predict and how its times are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .base import BETA_SCHEDULES, FLOW_PATHS, FLOW_PREDICTIONS, OBJECTIVES, T_SAMPLINGS, Config, field_default, nonnegative, option, positive

GAUSSIAN_FIELDS = ("betas", "time_offset")  # the settings of the discrete diffusion
MEANFLOW_FIELDS = ("mf_share", "mf_power", "mf_omega", "mf_kappa")  # MeanFlow's own; every other setting is the flow's
MEANFLOW_SHARED = ("t_sampling", "t_mean", "t_std", "time_scale")  # the flow's settings MeanFlow reads too (its path is linear, its output a velocity)
PREDICTION_FIELDS = ("objective", "path", "time_scale", "prediction")  # what a network's output means, beside its condition


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """What the network is trained to predict and how t is drawn; recorded with every model.
    gaussian: the paper's diffusion (eps and, with learn_sigma, the variance; uniform integer t).
    flow: SiT's interpolant (velocity; t in [0, 1], 0 = noise, 1 = data).
    vp: U-ViT's continuous VP SDE (eps; beta 0.1..20, t uniform in [0, 1], the network sees 999 t).
    meanflow: the average velocity over [t, r] on the flow's linear path (Geng et al. 2025)."""

    objective: str = field(default="gaussian", metadata=option("gaussian (the paper's diffusion), flow (SiT / rectified flow), vp (U-ViT's SDE) or meanflow (average velocity: one or two steps)", choices=OBJECTIVES))
    path: str = field(default="linear", metadata=option("flow path: linear (alpha = t, sigma = 1 - t) or gvp (sin, cos of pi t / 2)", choices=FLOW_PATHS))
    t_sampling: str = field(default="uniform", metadata=option("flow training times: uniform, or logit-normal (SD3)", choices=T_SAMPLINGS))
    t_mean: float = field(default=0.0, metadata=option("mean of the logit-normal times (SD3: 0)"))
    t_std: float = field(default=1.0, metadata=positive("standard deviation of the logit-normal times (SD3: 1)"))
    time_shift: float = field(default=1.0, metadata=positive("SD3 time shift s: t -> t / (t + s (1 - t)), more time near noise for s > 1; training times and the default sampling grid"))
    time_scale: float = field(default=1.0, metadata=positive("the network sees t * time_scale (SiT: 1; 1000 puts flow times on the diffusion's scale)"))
    cos_loss: float = field(default=0.0, metadata=nonnegative("weight of LightningDiT's velocity-direction term 1 - cos(v, u_t) added to the loss"))
    betas: str = field(default="linear", metadata=option("gaussian betas: linear 1e-4..0.02 (DiT) or scaled-linear 0.00085..0.012 (Stable Diffusion, U-ViT-H)", choices=BETA_SCHEDULES))
    time_offset: int = field(default=0, metadata=nonnegative("gaussian: the network sees step k + offset (U-ViT-H: 1, its 1-based step)"))
    prediction: str = field(default="velocity", metadata=option("what a flow network outputs: the velocity (SiT), or the clean image, whose implied velocity takes the loss (JiT, x-prediction)", choices=FLOW_PREDICTIONS))
    # MeanFlow (Geng et al. 2025): the average velocity over [t, r] (t_sampling, t_mean, t_std draw both times).
    mf_share: float = field(default=0.25, metadata=option("meanflow: share of each batch trained on an interval r > t; the rest at r = t, plain flow matching (the paper: 0.25)", ge=0, le=1))
    mf_power: float = field(default=1.0, metadata=nonnegative("meanflow: power p of the adaptive loss weight 1 / (||error||^2 + 0.01)^p (the paper: 1; 0 = plain squared error)"))
    mf_omega: float = field(default=1.0, metadata=option("meanflow: guidance folded into training, the target's weight omega of the sample's velocity (1 with --mf-kappa 0: none)", ge=0))
    mf_kappa: float = field(default=0.0, metadata=option("meanflow: the target's weight kappa of the model's conditional velocity; the effective guidance scale is omega / (1 - kappa)", ge=0, lt=1))

    def check(self) -> None:
        changed = [f.name for f in fields(ObjectiveConfig) if f.name not in ("objective", *own_fields(self.objective)) and getattr(self, f.name) != f.default]
        if changed:
            users = [o for o in OBJECTIVES if set(changed) <= set(own_fields(o))]
            if not users:
                raise ValueError(f"{', '.join(changed)} do not apply to --objective {self.objective}; drop them.")
            raise ValueError(f"{', '.join(changed)} only apply to {' or '.join('--objective ' + o for o in users)}; drop them or use --objective {users[0]}.")

    def prediction_differs(self, other: "ObjectiveConfig") -> list[str]:
        """The settings that give a network's output its meaning (what is predicted, on which path,
        at which time scale) where `other` differs: what an autoguidance guide must share with the
        model it guides. How training drew t or weighed the loss may differ."""
        return [f"{name} {getattr(other, name)!r} (the model's: {getattr(self, name)!r})" for name in PREDICTION_FIELDS
                if getattr(self, name) != getattr(other, name)]  # fmt: skip

    def to_dict(self) -> dict:
        """What a model records: the objective's own settings (a gaussian one's only where they are not the paper's)."""
        if self.objective == "meanflow":
            return {"objective": "meanflow", **{name: getattr(self, name) for name in own_fields("meanflow")}}
        if self.objective == "flow":
            d = {name: getattr(self, name) for name in ("objective", *own_fields("flow"))}
            if d["prediction"] == "velocity":  # as models recorded it before x-prediction existed
                del d["prediction"]
            return d
        changed = {k: getattr(self, k) for k in GAUSSIAN_FIELDS if self.objective == "gaussian" and getattr(self, k) != field_default(ObjectiveConfig, k)}
        return {"objective": self.objective, **changed}


def own_fields(objective: str) -> tuple[str, ...]:
    """The ObjectiveConfig settings `objective` reads (and records); the others must stay at their defaults."""
    if objective == "gaussian":
        return GAUSSIAN_FIELDS
    if objective == "flow":
        return tuple(f.name for f in fields(ObjectiveConfig) if f.name not in ("objective", *GAUSSIAN_FIELDS, *MEANFLOW_FIELDS))
    if objective == "meanflow":
        return (*MEANFLOW_SHARED, *MEANFLOW_FIELDS)
    return ()  # vp: U-ViT's fixed SDE


@dataclass(frozen=True)
class ObjectiveFlags(ObjectiveConfig):
    """ObjectiveConfig as ditkit train's flags give it. With --init-from and no --objective the
    objective is the base model's, known only once the base is read, so its cross-field rule waits
    for TrainConfig.check (`settled`)."""

    def check(self) -> None:
        pass

    def settled(self) -> ObjectiveConfig:
        """The objective these flags describe, checked."""
        return ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})
