"""`ditkit sample` (a PNG grid and per-image PNGs) and `ditkit sample-npz` (the ADM evaluator's
.npz, torchrun-parallel), both on the one pipeline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import SampleConfig, SampleNpzConfig
from .eval.npz import save_npz
from .pipeline import IMAGENET_DEMO_CLASSES, load_pipeline, save_grid, to_uint8
from .samplers import check_labels


def run_sample(cfg: SampleConfig) -> Path:
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample.py
    torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    to_file = out.suffix.lower() in Image.registered_extensions()  # --out grid.png: the grid is that file
    grid_path = out if to_file else out / "grid.png"
    save_images = cfg.save_images if cfg.save_images is not None else not to_file
    pipe = load_pipeline(cfg)
    c = pipe.config
    classes = cfg.classes or (tuple(range(c.num_classes)) if c.num_classes <= 16 else IMAGENET_DEMO_CLASSES)
    check_labels(torch.tensor(classes), c.num_classes)
    n = cfg.num_samples or (4 * len(classes) if len(classes) <= 16 else len(classes))
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    print(f"sampling {n} images from {pipe.source} with {pipe.sampling.describe()}, seed {cfg.seed}", flush=True)
    torch.manual_seed(cfg.seed)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = []
    for i in range(0, n, cfg.batch_size):
        chunks.append(to_uint8(pipe.images(labels[i : i + cfg.batch_size], progress=True)))
        print(f"sampled {min(i + cfg.batch_size, n)}/{n} ({time.perf_counter() - start:.1f}s)", flush=True)
    images = np.concatenate(chunks)
    if save_images:  # into the --out folder, or beside an --out file as NAME-000000.png
        name = f"{out.stem}-{{:06d}}.png" if to_file else "{:06d}.png"
        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(grid_path.parent / name.format(i))
    ncol = len(classes) if len(classes) <= 16 else min(8, n)
    save_grid(images, grid_path, ncol=ncol)
    print(f"wrote {grid_path}{f' and {n} images' if save_images else ''} in {time.perf_counter() - start:.1f}s")
    return grid_path


def run_sample_npz(cfg: SampleNpzConfig) -> Path:
    import torch.distributed as dist

    from .parallel import setup_distributed

    d = setup_distributed(cfg.device)
    world, rank = d.world, d.rank
    try:
        if cfg.num_samples < world:
            raise ValueError(f"--num-samples {cfg.num_samples} is fewer than the {world} processes; ask for at least one sample per process.")
        torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample_ddp.py
        torch.backends.cudnn.allow_tf32 = True
        pipe = load_pipeline(cfg, device=d.device)
        n = cfg.num_samples
        # Labels are drawn for all N at once, so they do not depend on the number of processes.
        labels = np.random.default_rng(cfg.seed).integers(0, pipe.config.num_classes, size=n)
        lo, hi = rank * n // world, (rank + 1) * n // world
        torch.manual_seed(cfg.seed * world + rank)  # the official sample_ddp.py's per-rank seed
        out = Path(cfg.out)
        chunks = []
        start = time.perf_counter()
        with tqdm(total=n, desc="sample-npz", unit="img", disable=rank != 0) as bar:
            for i in range(lo, hi, cfg.batch_size):
                y = torch.from_numpy(labels[i : min(i + cfg.batch_size, hi)])
                chunks.append(to_uint8(pipe.images(y)))
                bar.update(len(y) * world)  # rank 0's pace stands for all
        images = np.concatenate(chunks)
        if world == 1:
            save_npz(out, arr_0=images, labels=labels)
        else:
            _gather_parts(out, images, labels, rank, world)
        if rank == 0:
            elapsed = time.perf_counter() - start
            print(f"wrote {out}: {n} samples {'x'.join(map(str, images.shape[1:]))} uint8 with labels "
                  f"({pipe.sampling.describe()}) in {elapsed:.1f}s, {n / elapsed:.1f} img/s")  # fmt: skip
        return out
    finally:
        if d.started:
            dist.destroy_process_group()


def _gather_parts(out: Path, images: np.ndarray, labels: np.ndarray, rank: int, world: int) -> None:
    """Each rank writes its slice to a folder beside `out`; rank 0 joins them in rank order (works
    with gloo and across nodes that share the output filesystem) and removes the folder."""
    import torch.distributed as dist

    parts = out.parent / f".{out.name}.parts"
    save_npz(parts / f"rank{rank:05d}-of-{world:05d}.npz", arr_0=images)
    dist.barrier()
    if rank == 0:
        arrays = []
        for r in range(world):
            with np.load(parts / f"rank{r:05d}-of-{world:05d}.npz") as data:
                arrays.append(data["arr_0"])
        save_npz(out, arr_0=np.concatenate(arrays), labels=labels)
        shutil.rmtree(parts)
    dist.barrier()
