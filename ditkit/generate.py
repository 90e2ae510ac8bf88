"""`ditkit sample` (a PNG grid and per-image PNGs; for a video model an animated grid, its frames and
per-clip GIFs) and `ditkit sample-npz` (the ADM evaluator's .npz, torchrun-parallel; clips as
N×T×H×W×C), both on the one pipeline."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import SampleConfig, SampleNpzConfig
from .parallel import barrier, setup_distributed
from .pipeline import IMAGENET_DEMO_CLASSES, Pipeline, load_pipeline
from .samplers import check_labels
from .text.prompts import read_prompts
from .utils.images import save_grid, to_uint8
from .utils.io import atomic_write, remove_temporaries, save_npz
from .video.io import save_clip_grid, write_gif


def prompt_list(cfg: SampleConfig | SampleNpzConfig) -> list[str]:
    """--prompt values, then the lines of --prompts (a file or a fashion-mnist-captions suite)."""
    return [*cfg.prompt, *(read_prompts(cfg.prompts) if cfg.prompts else [])]


def conditioner(pipe: Pipeline, cfg: SampleConfig | SampleNpzConfig) -> tuple[list, Callable]:
    """(what is sampled: prompts or class ids, a function from a list of them to the model's condition)."""
    if pipe.text_encoder is None:
        return [], lambda ids: torch.tensor(ids)
    if getattr(cfg, "classes", ()):
        raise ValueError(f"this is a {pipe.config.kind} model: it takes prompts (--prompt), not class ids; drop --classes.")
    prompts = prompt_list(cfg)
    if not prompts:
        raise ValueError(f"this is a {pipe.config.kind} model; pass --prompt TEXT (repeat it for more) or --prompts FILE.")
    return prompts, pipe.condition


def run_sample(cfg: SampleConfig) -> Path:
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample.py
    torch.backends.cudnn.allow_tf32 = True
    pipe = load_pipeline(cfg)
    c = pipe.config
    video = len(c.sample_shape) == 4
    out = Path(cfg.out)
    # --out grid.png (clips.gif, clips.mp4): the grid is that file
    to_file = out.suffix.lower() in Image.registered_extensions() or (video and out.suffix.lower() == ".mp4")
    if video and to_file and out.suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"--out {out}: a video model's grid is animated; name it NAME.gif or NAME.mp4, or pass a folder.")
    grid_path = out if to_file else out / ("grid.gif" if video else "grid.png")
    save_images = cfg.save_images if cfg.save_images is not None else not to_file
    items, condition = conditioner(pipe, cfg)
    if not items:
        items = list(cfg.classes or (tuple(range(c.num_real_classes)) if c.num_real_classes <= 16 else IMAGENET_DEMO_CLASSES))
        check_labels(torch.tensor(items), c.num_real_classes)
    n = cfg.num_samples or (4 * len(items) if len(items) <= 16 else len(items))
    order = [items[i % len(items)] for i in range(n)]
    print(f"sampling {n} {'clips' if video else 'images'} from {pipe.describe_source()} with {pipe.describe_sampling()}, seed {cfg.seed}", flush=True)
    if pipe.text_encoder is not None:  # the prompts, as the model reads them (long lists: the first ones)
        print(f"prompts: {'; '.join(repr(p) for p in items[:16])}{f'; ... ({len(items)} in all)' if len(items) > 16 else ''}", flush=True)
    torch.manual_seed(cfg.seed)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = []
    for i in range(0, n, cfg.batch_size):
        chunks.append(to_uint8(pipe.images(condition(order[i : i + cfg.batch_size]), progress=True)))
        print(f"sampled {min(i + cfg.batch_size, n)}/{n} ({time.perf_counter() - start:.1f}s)", flush=True)
    images = np.concatenate(chunks)  # (N, H, W, C), clips (N, T, H, W, C)
    ext = "gif" if video else "png"
    if save_images:  # into the --out folder, or beside an --out file as NAME-000000.png (.gif)
        name = f"{out.stem}-{{:06d}}.{ext}" if to_file else f"{{:06d}}.{ext}"
        for i, img in enumerate(images):
            if video:
                write_gif(img, grid_path.parent / name.format(i))
            else:
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(grid_path.parent / name.format(i))
    ncol = len(items) if len(items) <= 16 else min(8, n)
    if video:  # the animated grid; in a folder also its MP4 (with PyAV) and its frames
        written = save_clip_grid(images, grid_path, ncol, mp4=not to_file, frames=not to_file)
    else:
        save_grid(images, grid_path, ncol=ncol)
        written = [grid_path]
    what = f" and {n} {'clips' if video else 'images'}" if save_images else ""
    print(f"wrote {', '.join(map(str, written))}{what} in {time.perf_counter() - start:.1f}s")
    return grid_path


def run_sample_npz(cfg: SampleNpzConfig) -> Path:
    """Batch i of the N samples is a finished shard, `.OUT.parts/i.npz`, as soon as it is drawn;
    its noise comes from a generator seeded by (seed, i), so the result depends neither on the
    number of processes nor on interruptions: the same command resumes where a killed run
    stopped. Rank 0 joins the shards into OUT at the end."""
    d = setup_distributed(cfg.device)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample_ddp.py
        torch.backends.cudnn.allow_tf32 = True
        out = Path(cfg.out)
        parts = out.parent / f".{out.name}.parts"
        plan = json.loads(json.dumps({**asdict(cfg), "out": None, "device": d.device.type}))  # what the shards depend on
        resumed = _check_parts(parts, plan)  # every rank checks before anyone writes
        if out.exists() and not resumed:  # OUT beside its own shards: a join that a kill interrupted, finished below
            raise FileExistsError(f"{out} already exists; pass another --out, or delete it to sample again "
                                  "(sample-npz resumes only its own unfinished runs).")  # fmt: skip
        pipe = load_pipeline(cfg, device=d.device)
        n, bs = cfg.num_samples, cfg.batch_size
        prompts, condition = conditioner(pipe, cfg)
        if prompts:  # sample i takes prompt i mod P
            labels = np.array([prompts[i % len(prompts)] for i in range(n)])
        else:  # labels are drawn for all N at once, so they do not depend on the number of processes
            labels = np.random.default_rng(cfg.seed).integers(0, pipe.config.num_real_classes, size=n)
        extra = {"prompts": labels} if prompts else {"labels": labels}
        barrier(d)
        if d.main:
            remove_temporaries(out.parent, out.name)  # left by a join that a kill interrupted
            remove_temporaries(parts)
            if not resumed:
                shutil.rmtree(parts, ignore_errors=True)  # batches of unknown settings
                atomic_write(parts / PLAN, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1) + "\n"))
        barrier(d)
        shards = range(math.ceil(n / bs))
        todo = [i for i in shards[d.rank :: d.world] if not (parts / SHARD.format(i)).exists()]
        done = sum(min(bs, n - i * bs) for i in shards if (parts / SHARD.format(i)).exists())
        if d.main:
            print(f"sample-npz: {n} samples ({pipe.describe_sampling()}) on {d.world} process(es) into {out}"
                  + (f"; resuming with {done} already in {parts}" if done else ""), flush=True)  # fmt: skip
        start = time.perf_counter()
        with tqdm(total=n, initial=done, desc="sample-npz", unit="img", disable=not d.main) as bar:
            for k, i in enumerate(todo):
                y = condition(labels[i * bs : (i + 1) * bs].tolist())
                g = torch.Generator(device=d.device).manual_seed((cfg.seed * 1_000_003 + i) % 2**63)
                save_npz(parts / SHARD.format(i), arr_0=to_uint8(pipe.images(y, generator=g)))
                bar.update(min(bs, n - i * bs) * d.world)  # rank 0's pace stands for all
                if k == 0 and d.main and len(todo) > 1:
                    took = time.perf_counter() - start
                    bar.write(f"sample-npz: the first batch of {min(bs, n - i * bs)} took {took:.1f}s: about {_duration(took * (len(todo) - 1))} to go")
        barrier(d)
        if d.main:
            images = _join_shards(parts, len(shards))
            save_npz(out, arr_0=images, **extra)
            shutil.rmtree(parts)
            elapsed = time.perf_counter() - start
            print(f"wrote {out}: {n} samples {'x'.join(map(str, images.shape[1:]))} uint8 with {next(iter(extra))} "
                  f"({pipe.describe_sampling()}) in {elapsed:.1f}s", flush=True)  # fmt: skip
        barrier(d)
        return out
    finally:
        if d.started:
            torch.distributed.destroy_process_group()


SHARD, PLAN = "{:07d}.npz", "plan.json"  # in .OUT.parts/: shard i, and the settings the shards were drawn with


def _check_parts(parts: Path, plan: dict) -> bool:
    """Whether `parts` holds shards of this very plan (to resume); raises if it holds another's."""
    if not (parts / PLAN).exists():
        return False
    saved = json.loads((parts / PLAN).read_text())
    if saved != plan:
        changed = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in plan if saved.get(k) != plan[k])
        raise ValueError(f"{parts} holds the finished batches of an interrupted sample-npz with other settings ({changed}); "
                         f"run it with those to finish it, or delete {parts} to start over.")  # fmt: skip
    return True


def _join_shards(parts: Path, count: int) -> np.ndarray:
    arrays = []
    for i in range(count):
        with np.load(parts / SHARD.format(i)) as data:
            arrays.append(data["arr_0"])
    return np.concatenate(arrays)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 1 else "under a second"
