"""What a network is trained to predict and how its times are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .base import BETA_SCHEDULES, FLOW_PATHS, FLOW_PREDICTIONS, OBJECTIVES, T_SAMPLINGS, Config, field_default, nonnegative, option, positive

GAUSSIAN_FIELDS = ("betas", "time_offset")  # the settings of the discrete diffusion; every other one is the flow's
PREDICTION_FIELDS = ("objective", "path", "time_scale", "prediction")  # what a network's output means, beside its condition


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """What the network is trained to predict and how t is drawn; recorded with every model.
    gaussian: the paper's diffusion (eps and, with learn_sigma, the variance; uniform integer t).
    flow: SiT's interpolant (velocity; t in [0, 1], 0 = noise, 1 = data).
    vp: U-ViT's continuous VP SDE (eps; beta 0.1..20, t uniform in [0, 1], the network sees 999 t)."""

    objective: str = field(default="gaussian", metadata=option("gaussian (the paper's diffusion) or flow (SiT / rectified flow)", choices=OBJECTIVES))
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

    def check(self) -> None:
        own = {"gaussian": GAUSSIAN_FIELDS, "flow": tuple(f.name for f in fields(ObjectiveConfig) if f.name not in GAUSSIAN_FIELDS)}.get(self.objective, ())
        changed = [f.name for f in fields(ObjectiveConfig) if f.name not in ("objective", *own) and getattr(self, f.name) != f.default]
        if changed:
            other = "flow" if self.objective != "flow" and not set(changed) & set(GAUSSIAN_FIELDS) else "gaussian"
            raise ValueError(f"{', '.join(changed)} only apply to --objective {other}; drop them or use --objective {other}.")

    def prediction_differs(self, other: "ObjectiveConfig") -> list[str]:
        """The settings that give a network's output its meaning (what is predicted, on which path,
        at which time scale) where `other` differs: what an autoguidance guide must share with the
        model it guides. How training drew t or weighed the loss may differ."""
        return [f"{name} {getattr(other, name)!r} (the model's: {getattr(self, name)!r})" for name in PREDICTION_FIELDS
                if getattr(self, name) != getattr(other, name)]  # fmt: skip

    def to_dict(self) -> dict:
        """What a model records: the objective's own settings (a gaussian one's only where they are not the paper's)."""
        if self.objective == "flow":
            d = {f.name: getattr(self, f.name) for f in fields(ObjectiveConfig) if f.name not in GAUSSIAN_FIELDS}
            if d["prediction"] == "velocity":  # as models recorded it before x-prediction existed
                del d["prediction"]
            return d
        changed = {k: getattr(self, k) for k in GAUSSIAN_FIELDS if self.objective == "gaussian" and getattr(self, k) != field_default(ObjectiveConfig, k)}
        return {"objective": self.objective, **changed}


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
