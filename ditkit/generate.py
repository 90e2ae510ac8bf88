"""`ditkit sample` (a PNG grid and per-image PNGs) and `ditkit sample-npz` (the ADM evaluator's
.npz, torchrun-parallel), both on the one pipeline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import SampleConfig, SampleNpzConfig
from .eval.npz import save_npz
from .pipeline import IMAGENET_DEMO_CLASSES, Pipeline, load_pipeline, save_grid, to_uint8
from .samplers import check_labels


def prompt_list(cfg: SampleConfig | SampleNpzConfig) -> list[str]:
    """--prompt values, then the lines of --prompts (a file or a fashion-mnist-captions suite)."""
    from .eval.prompts import read_prompts

    return [*cfg.prompt, *(read_prompts(cfg.prompts) if cfg.prompts else [])]


def conditioner(pipe: Pipeline, cfg: SampleConfig | SampleNpzConfig) -> tuple[list, Callable]:
    """(what is sampled: prompts or class ids, a function from a list of them to the model's condition)."""
    if pipe.text_encoder is None:
        return [], lambda ids: torch.tensor(ids)
    if getattr(cfg, "classes", ()):
        raise ValueError("this is a text-to-image model: it takes prompts (--prompt), not class ids; drop --classes.")
    prompts = prompt_list(cfg)
    if not prompts:
        raise ValueError("this is a text-to-image model; pass --prompt TEXT (repeat it for more) or --prompts FILE.")
    return prompts, pipe.condition


def run_sample(cfg: SampleConfig) -> Path:
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample.py
    torch.backends.cudnn.allow_tf32 = True
    pipe = load_pipeline(cfg)
    c = pipe.config
    items, condition = conditioner(pipe, cfg)
    if not items:
        items = list(cfg.classes or (tuple(range(c.num_classes)) if c.num_classes <= 16 else IMAGENET_DEMO_CLASSES))
        check_labels(torch.tensor(items), c.num_classes)
    n = cfg.num_samples or (4 * len(items) if len(items) <= 16 else len(items))
    order = [items[i % len(items)] for i in range(n)]
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = []
    for i in range(0, n, cfg.batch_size):
        chunks.append(to_uint8(pipe.images(condition(order[i : i + cfg.batch_size]), progress=True)))
        print(f"sampled {min(i + cfg.batch_size, n)}/{n} ({time.perf_counter() - start:.1f}s)", flush=True)
    images = np.concatenate(chunks)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")
    ncol = len(items) if len(items) <= 16 else min(8, n)
    save_grid(images, out / "grid.png", ncol=ncol)
    print(f"wrote {out / 'grid.png'} and {n} images ({pipe.sampling.describe()}) in {time.perf_counter() - start:.1f}s")
    return out / "grid.png"


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
        prompts, condition = conditioner(pipe, cfg)
        if prompts:  # sample i takes prompt i mod P
            labels = np.array([prompts[i % len(prompts)] for i in range(n)])
        else:  # labels are drawn for all N at once, so they do not depend on the number of processes
            labels = np.random.default_rng(cfg.seed).integers(0, pipe.config.num_classes, size=n)
        lo, hi = rank * n // world, (rank + 1) * n // world
        torch.manual_seed(cfg.seed * world + rank)  # the official sample_ddp.py's per-rank seed
        out = Path(cfg.out)
        chunks = []
        start = time.perf_counter()
        with tqdm(total=n, desc="sample-npz", unit="img", disable=rank != 0) as bar:
            for i in range(lo, hi, cfg.batch_size):
                y = condition(labels[i : min(i + cfg.batch_size, hi)].tolist())
                chunks.append(to_uint8(pipe.images(y)))
                bar.update(len(y) * world)  # rank 0's pace stands for all
        images = np.concatenate(chunks)
        extra = {"prompts": labels} if prompts else {"labels": labels}
        if world == 1:
            save_npz(out, arr_0=images, **extra)
        else:
            _gather_parts(out, images, extra, rank, world)
        if rank == 0:
            elapsed = time.perf_counter() - start
            print(f"wrote {out}: {n} samples {'x'.join(map(str, images.shape[1:]))} uint8 with {next(iter(extra))} "
                  f"({pipe.sampling.describe()}) in {elapsed:.1f}s, {n / elapsed:.1f} img/s")  # fmt: skip
        return out
    finally:
        if d.started:
            dist.destroy_process_group()


def _gather_parts(out: Path, images: np.ndarray, extra: dict[str, np.ndarray], rank: int, world: int) -> None:
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
        save_npz(out, arr_0=np.concatenate(arrays), **extra)
        shutil.rmtree(parts)
    dist.barrier()
