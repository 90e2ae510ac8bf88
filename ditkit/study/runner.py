"""`ditkit study`: train every run of the plan, score it, and write the tables and plots.

Layout of OUT (a killed study run again with the same flags picks up where it stopped; several
study processes may share one OUT: each run is trained by whichever takes its lock first):

    study.json                the settings, checked on every restart
    reference.npz, cache/     the reference images and their feature statistics
    runs/NAME/run.json        the run: family, sizes, params, Gflops, its TrainConfig
    runs/NAME/.lock           held by the process training or scoring the run
    runs/NAME/NNN-MODEL/      the Trainer's experiment: checkpoints/, model/, log.csv
    runs/NAME/samples.npz     the samples scored (ADM format: ditkit eval reads them)
    runs/NAME/done.json       the run's metrics and its training time
    runs/NAME/speed.json      its images/s measured alone (--time-runs)
    results.csv, results.json one row per run; table.md, the same grouped over seeds
    *.png                     the plots (ditkit.study_plots)
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..config import StudyConfig, TrainConfig
from ..study_plots import plot_results, summary_table
from ..train import ClassTask, Trainer
from ..utils.io import atomic_write
from ..utils.runs import latest_checkpoint
from .plan import DataInfo, Run, data_info, describe_run, plan_runs, recipe_settings
from .score import Scorer, eval_sampling, load_checkpoint_model, time_training

RESULT_COLUMNS = ("run", "family", "label", "model", "block", "patch", "seed", "level", "grids", "params", "gflops", "images",
                  "train_s", "images_per_s", "fd_effnet", "accuracy")  # fmt: skip
# Settings that may change between invocations of one study: which runs exist, and how they run.
FREE_SETTINGS = ("out", "seeds", "grids", "models", "block_model", "blocks", "levels", "device", "num_workers", "log_every", "eval_batch_size", "time_runs")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def check_settings(cfg: StudyConfig) -> None:
    """A study folder keeps the settings it was started with: otherwise its runs would not compare."""
    path = Path(cfg.out) / "study.json"
    saved = read_json(path)
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as the lists the file holds
    if saved is not None:
        changed = [k for k in now if k not in FREE_SETTINGS and k in saved and saved[k] != now[k]]
        if changed:
            diff = ", ".join(f"{k}: {saved[k]} -> {now[k]}" for k in changed)
            raise ValueError(f"{cfg.out} was started with other settings ({diff}); use the same settings to continue it, or a new --out.")
    write_json(path, now)


def train_seconds(run_dir: Path) -> float | None:
    """The run's training time from its log.csv (the elapsed seconds of the last row)."""
    logs = sorted(run_dir.glob("*/log.csv"))
    if not logs:
        return None
    with open(logs[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["elapsed_s"]) if rows else None


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._scorer: Scorer | None = None
        self.recipe = TrainConfig(**recipe_settings(cfg))
        self.info: DataInfo | None = None

    @property
    def scorer(self) -> Scorer:  # loaded on first use: a finished study re-plots without it
        if self._scorer is None:
            self._scorer = Scorer(self.cfg, self.info, self.recipe.data_path, eval_sampling(self.cfg, self.recipe), self.out)
        return self._scorer

    def plan(self) -> list[Run]:
        self.info = data_info(self.recipe.data_path)
        saved = {p.parent.name: read_json(p) for p in (self.out / "runs").glob("*/run.json")}
        return plan_runs(self.cfg, self.info, saved)

    def run(self) -> Path:
        cfg = self.cfg
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("ditkit study runs in one process; start it without torchrun (each run uses the whole device).")
        self.out.mkdir(parents=True, exist_ok=True)
        check_settings(cfg)
        runs = self.plan()
        for run in runs:  # every config is built (and its run.json written) before any training, so a bad one fails at once
            self.run_dir(run)
        # The biggest first: they say soonest whether the budget is long enough for the goal.
        runs.sort(key=lambda r: (r.seed, -read_json(Path(r.train.results_dir) / "run.json")["gflops"]))
        start = time.perf_counter()
        if cfg.time_runs:  # timing touches only speed.json: no lock, so it runs beside training processes
            for i, run in enumerate(runs, 1):
                self.time_one(run, f"[{i}/{len(runs)}]")
            self.write_results(runs)
        else:
            self.train_all(runs)
        print(f"study done in {time.perf_counter() - start:.0f}s: {self.out / 'table.md'} and plots in {self.out}", flush=True)
        return self.out

    def train_all(self, runs: list[Run]) -> None:
        """Train and score every run this process can lock; then wait for the ones others hold."""
        waiting: list = []
        for wait, todo in ((False, list(enumerate(runs, 1))), (True, waiting)):
            for i, run in todo:
                with self.lock(run, wait) as mine:
                    if not mine:
                        waiting.append((i, run))
                        continue
                    self.run_one(run, f"[{i}/{len(runs)}]")
                self.write_results(runs)

    @contextlib.contextmanager
    def lock(self, run: Run, wait: bool):
        """Whether this process holds the run's lock (waiting for it if `wait`), for the block."""
        with open(Path(run.train.results_dir) / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run_dir(self, run: Run) -> Path:
        path = Path(run.train.results_dir)
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "run.json").exists():
            write_json(path / "run.json", describe_run(run, self.info))
        return path

    def run_one(self, run: Run, tag: str) -> None:
        run_dir = self.run_dir(run)
        if (run_dir / "done.json").exists():
            print(f"{tag} {run.name}: done", flush=True)
            return
        meta = read_json(run_dir / "run.json")
        latest = latest_checkpoint(run_dir)
        print(f"{tag} {run.name} ({run.label}): {meta['params']:,} parameters, {meta['gflops']:.3g} Gflops, {run.train.max_steps} steps", flush=True)
        if latest is None or latest.stem != f"{run.train.max_steps:07d}":
            Trainer(replace(run.train, resume="latest" if latest else None), task=ClassTask(run.factory(), name=run.label)).run()
            latest = latest_checkpoint(run_dir)
        model, objective = load_checkpoint_model(run, latest)
        metrics = self.scorer.score(model, objective, run_dir / "samples.npz")
        write_json(run_dir / "done.json", {**metrics, "step": run.train.max_steps, "train_s": train_seconds(run_dir)})
        acc = f", accuracy {metrics['accuracy']:.3f}" if metrics["accuracy"] is not None else ""
        print(f"{tag} {run.name}: FD-EffNet {metrics['fd_effnet']:.1f}{acc}", flush=True)

    def time_one(self, run: Run, tag: str) -> None:
        run_dir = self.run_dir(run)
        if (run_dir / "speed.json").exists():
            return
        scratch = self.out / "timing"
        shutil.rmtree(scratch, ignore_errors=True)
        speed = time_training(run, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        write_json(run_dir / "speed.json", speed)
        print(f"{tag} {run.name}: {speed['images_per_s']:.1f} images/s", flush=True)

    def rows(self, runs: list[Run]) -> list[dict]:
        rows = []
        for run in runs:
            run_dir = Path(run.train.results_dir)
            meta, done = read_json(run_dir / "run.json"), read_json(run_dir / "done.json")
            if meta is None or done is None:
                continue
            speed = read_json(run_dir / "speed.json") or {}
            rows.append({**{k: meta[k] for k in RESULT_COLUMNS[:11]}, "grids": list(run.grids), "images": self.cfg.images,
                         "train_s": done.get("train_s"), "images_per_s": speed.get("images_per_cpu_s" if speed.get("threads") == 1 else "images_per_s"),
                         "fd_effnet": done["fd_effnet"], "accuracy": done["accuracy"]})  # fmt: skip
        return rows

    def write_results(self, runs: list[Run]) -> None:
        rows = self.rows(runs)

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
                w.writeheader()
                w.writerows({k: "" if r[k] is None else (" ".join(r[k]) if k == "grids" else r[k]) for k in RESULT_COLUMNS} for r in rows)

        atomic_write(self.out / "results.csv", write_csv)
        s = eval_sampling(self.cfg, self.recipe)
        notes = {"fd_effnet": f"Fréchet distance of EfficientNet-Lite0 features (not FID), {self.cfg.num_eval_samples} samples ({s.describe()}) "
                              "against the held-out images", "accuracy": "Fashion-MNIST classifier accuracy on the samples' labels",
                 "gflops": "G multiply-adds per forward of one image", "params": "parameters", "train_s": "training seconds as logged (shared machine)",
                 "images_per_s": "training images/s alone (--time-runs; with one thread, images per CPU-second: one idle core's rate)"}  # fmt: skip
        write_json(self.out / "results.json", {"study": asdict(self.cfg), "recipe": self.recipe.flat(), "columns": notes, "rows": rows})
        atomic_write(self.out / "table.md", lambda tmp: Path(tmp).write_text(summary_table(rows)))
        if rows:
            plot_results(rows, self.cfg, self.out)


def run_study(cfg: StudyConfig) -> Path:
    return Study(cfg).run()
