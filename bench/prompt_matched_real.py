"""What real images score on a text model's prompt suite: the floor its FD-EffNet is read against.

    python bench/prompt_matched_real.py --num-samples 1500

The fashion-mnist-captions suite (500 prompts each of seen phrasings, unseen phrasings and
held-out pairs) names a class and both attributes in every prompt, and its held-out third holds
only four classes (light trousers, dark sneakers, large bags, small dresses). So even perfect
samples would not be distributed as the test set, and their FD-EffNet against it would exceed the
real-vs-real distance of N random images. This script measures both, on Fashion-MNIST training
images: N drawn at random, and N matched to the suite's prompts (sample i takes prompt i mod P,
as in sample-npz; each gets a training image of the named class whose measured brightness and size
are the ones named, as the captions were made). The matched set also gives the prompt following
that real images reach: their attributes are right by construction, and their class accuracy is
the shipped classifier's on that class mix.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.config import EvalConfig  # noqa: E402
from ditkit.eval.evaluate import evaluate  # noqa: E402
from ditkit.eval.npz import fashion_mnist, save_npz  # noqa: E402
from ditkit.text.captions import ATTRIBUTES, measure_attributes, parse_prompt  # noqa: E402
from ditkit.text.prompts import GROUPS, read_prompts  # noqa: E402


def matched_images(prompts: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, their prompts): for sample i, a training image that fits prompt i mod P, drawn
    without replacement while the pool of its class and attributes lasts."""
    images, labels = fashion_mnist("train")
    measured = measure_attributes(images, labels)
    rng = np.random.default_rng(seed)
    pools: dict[tuple, list[int]] = {}
    chosen, used_prompts = [], []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        cls, words = parse_prompt(prompt)
        if cls is None:
            raise ValueError(f"prompt {prompt!r} names no Fashion-MNIST class; a real image cannot be matched to it.")
        key = (cls, *sorted(words.items()))
        if not pools.get(key):
            fits = labels == cls
            for name, word in words.items():
                fits &= measured[name] == ATTRIBUTES[name].index(word)
            pools[key] = list(rng.permutation(np.flatnonzero(fits)))
            if not pools[key]:
                raise ValueError(f"no training image fits prompt {prompt!r}; pass prompts that name a class and attributes it has.")
        chosen.append(pools[key].pop())
        used_prompts.append(prompt)
    return images[np.array(chosen)], np.array(used_prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default="fashion-mnist-captions", help="a suite or a file of prompts")
    p.add_argument("--num-samples", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.num_samples < 1281:
        p.error(f"--num-samples {args.num_samples}: FD-EffNet needs at least 1281 samples (1280-d features); pass 1281 or more.")
    prompts = read_prompts(args.prompts)
    images, used = matched_images(prompts, args.num_samples, args.seed)
    random = evaluate(EvalConfig(samples=f"fashion-mnist-train:{args.num_samples}", ref="fashion-mnist", device="cpu", batch_size=256))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_npz(Path(tmp) / "matched.npz", arr_0=images, prompts=used)
        matched = evaluate(EvalConfig(samples=str(path), ref="fashion-mnist", device="cpu", batch_size=256))
    follow = matched["prompt_following"]
    print(f"{args.num_samples} Fashion-MNIST training images against the test set (FD-EffNet):")
    print(f"  drawn at random                 {random['metrics']['FD-EffNet']:8.1f}   (class accuracy {random['metrics']['accuracy']:.3f})")
    print(f"  matched to the prompts' suite   {matched['metrics']['FD-EffNet']:8.1f}   ({args.prompts})")
    print("  prompt following of the matched images: " + ", ".join(
        f"{g} {follow[g]['class_accuracy']:.3f} (attributes {follow[g]['attribute_accuracy']:.3f})" for g in GROUPS if g in follow))


if __name__ == "__main__":
    main()
