"""`ditkit distill`: students of a flow-matching teacher that need fewer network evaluations.

guidance     The student takes the guidance scale w as an input (DiTConfig.cfg_embed) and learns the
             teacher's guided velocity v_null + w (v_cond - v_null) at the teacher's training points
             (data interpolated with noise at the teacher's training times), w uniform in --cfg-range:
             guided sampling in one pass of N instead of one of 2N.
progressive  Salimans & Ho (2022) on the velocity ODE: a student of N Euler steps learns to go in one
             step where its teacher goes in two, N halving per phase from --start-steps down to
             --student-steps. The first phase's teacher is the guided teacher (Heun, or Euler if that
             is its sampler) at its own scale and interval, so the students need no guidance; each
             later phase's teacher is the previous phase's student (its EMA, kept in the checkpoint).
reflow       Liu et al. (2023): (noise, sample) pairs from the guided teacher at its own sampler,
             cached in the run folder (a resume reuses them), and flow matching on the straight line
             between them; the last --one-step-share of the steps put half of each batch at t = 0,
             where one Euler step is the whole map.

Each method is a task of ditkit train's Trainer (`Distillation`: the student, its data and its
loss), so the run folder, log.csv, atomic checkpoints, EMA, exact resume and the model/ folder are
ditkit train's. The randomness of a step is drawn for the global batch from (seed, step), so a
resumed run continues with the same numbers.
"""

from .run import Distiller, run_distill
from .task import Distillation
from .teacher import Teacher, denoised, guided_velocity, load_teacher, ode_step, recorded_data

__all__ = ["Distillation", "Distiller", "Teacher", "denoised", "guided_velocity", "load_teacher", "ode_step", "recorded_data", "run_distill"]
