"""`ditkit study`: the paper's design space at a budget where models learn.

plan.py says which networks train (the grids, sized to matched Gflops where they compare
backbones) and with which settings (the recipe's); score.py samples and scores a trained run and
times a run's steps alone; runner.py trains, scores, resumes and writes the tables and plots.
"""

from .plan import DataInfo, Run, data_info, plan_runs, size_unet, size_uvit
from .runner import Study, run_study

__all__ = ["DataInfo", "Run", "Study", "data_info", "plan_runs", "run_study", "size_unet", "size_uvit"]
