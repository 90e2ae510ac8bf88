"""What a run shows and keeps of its progress: a progress bar, log.csv and TensorBoard."""

from __future__ import annotations

import contextlib
import csv
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..utils.io import atomic_write

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s")


class RunLog:
    """Progress bar (loss, images/s, ETA) on rank 0, a CSV log, and TensorBoard when installed."""

    def __init__(self, exp_dir: Path, main: bool, total: float, start_step: int):
        self.main = main
        if not main:
            return
        self.bar = tqdm(total=None if math.isinf(total) else int(total), initial=start_step, desc="train", dynamic_ncols=True)
        path = exp_dir / "log.csv"
        if path.exists():
            truncate_log(path, start_step)
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(LOG_COLUMNS)
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run logged after its last checkpoint
            self.tb = SummaryWriter(str(exp_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.start = self.last = time.perf_counter()
        self.last_step = start_step

    def write(self, step: int, epoch: int, loss: float, lr: float, global_batch: int) -> None:
        if not self.main:
            return
        now = time.perf_counter()
        ips = (step - self.last_step) * global_batch / max(now - self.last, 1e-9)
        self.csv.writerow([step, epoch, f"{loss:.6f}", f"{lr:.3g}", f"{ips:.1f}", f"{now - self.start:.1f}"])
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("images_per_s", ips, step)
        self.bar.update(step - self.last_step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", epoch=epoch)
        self.last, self.last_step = now, step

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of log.csv after `step` (and a half-written last row): a killed run logged
    them after its last checkpoint, and the resumed run logs those steps again."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= step]
    if keep != rows:

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)

        atomic_write(path, write)
