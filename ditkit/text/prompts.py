"""Prompt following of a text-to-image model on fashion-mnist-captions' vocabulary.

For each generated image and the prompt it was made from: the class the prompt names is checked
with the shipped Fashion-MNIST classifier, and each attribute it names (dark / light, small /
large) is measured from the pixels exactly as the captions were made (`captions.measure_attributes`,
against the class's training medians). Prompts fall in three groups: training phrasings of pairs
seen in training ("seen"), other phrasings of the same ("unseen"), and prompts naming a pair
whose images were held out of training ("held-out").

Suites of prompts for the three groups: `prompt_suite`, also by name in `--prompts`
(`fashion-mnist-captions:seen`, `:unseen`, `:held-out`, or `fashion-mnist-captions` for all
three interleaved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .captions import (
    ATTRIBUTES,
    HELD_OUT,
    NOUNS,
    SEEN_PHRASINGS,
    UNSEEN_PHRASINGS,
    caption,
    caption_vocabulary,
    held_out,
    measure_attributes,
    parse_prompt,
)

GROUPS = ("seen", "unseen", "held-out")
SUITE = "fashion-mnist-captions"
SUITE_SIZE = 600  # prompts per group


def prompt_suite(group: str, n: int = SUITE_SIZE, seed: int = 0) -> list[str]:
    """`n` prompts of a group, each naming a class and both attributes, drawn with `seed`."""
    rng = np.random.default_rng([seed, GROUPS.index(group)])
    prompts = []
    while len(prompts) < n:
        if group == "held-out":  # a held-out pair, the other attribute drawn
            cls, name, word = HELD_OUT[rng.integers(len(HELD_OUT))]
            other = next(a for a in ATTRIBUTES if a != name)
            words = {name: word, other: ATTRIBUTES[other][rng.integers(2)]}
        else:
            cls = int(rng.integers(len(NOUNS)))
            words = {a: pair[rng.integers(2)] for a, pair in ATTRIBUTES.items()}
            if held_out(cls, words):
                continue
        phrasings = UNSEEN_PHRASINGS if group == "unseen" else SEEN_PHRASINGS
        prompts.append(caption(cls, words, phrasings[rng.integers(len(phrasings))]))
    return prompts


def read_prompts(spec: str) -> list[str]:
    """A suite by name, or the non-blank lines of a text file."""
    if spec == SUITE:
        return [p for triple in zip(*(prompt_suite(g) for g in GROUPS)) for p in triple]
    if spec.startswith(SUITE + ":"):
        group = spec.split(":", 1)[1]
        if group not in GROUPS:
            raise ValueError(f"unknown prompt suite {spec}; use {SUITE} or {', '.join(f'{SUITE}:{g}' for g in GROUPS)}.")
        return prompt_suite(group)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {spec} does not exist; pass a text file with one prompt per line, or {SUITE}[:GROUP].")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {spec} holds no prompts; write one prompt per line.")
    return prompts


def prompt_group(prompt: str, cls: int, words: dict[str, str]) -> str:
    if held_out(cls, words):
        return "held-out"
    return "seen" if prompt in caption_vocabulary() else "unseen"


def prompt_following(images: np.ndarray, prompts: np.ndarray, predicted: np.ndarray) -> dict:
    """{group: {"prompts", "class_accuracy", "attribute_accuracy", per-attribute accuracies}} for
    gray uint8 images (N, H, W, 1), their prompts, and the classifier's predicted classes.
    Prompts that name no class are counted under "unscored"."""
    parsed = [parse_prompt(str(p)) for p in prompts]
    scored = np.array([cls is not None for cls, _ in parsed])
    classes = np.array([cls if cls is not None else 0 for cls, _ in parsed])
    measured = measure_attributes(images, classes)
    groups = np.array([prompt_group(str(p), cls, words) if cls is not None else "" for p, (cls, words) in zip(prompts, parsed)])
    result = {}
    for group in GROUPS:
        rows = np.flatnonzero(scored & (groups == group))
        if not len(rows):
            continue
        hits = {name: [measured[name][i] == ATTRIBUTES[name].index(parsed[i][1][name]) for i in rows if name in parsed[i][1]] for name in ATTRIBUTES}
        every = [h for name in ATTRIBUTES for h in hits[name]]
        result[group] = {
            "prompts": int(len(rows)),
            "class_accuracy": float((predicted[rows] == classes[rows]).mean()),
            "attribute_accuracy": float(np.mean(every)) if every else float("nan"),
            **{f"{name}_accuracy": float(np.mean(h)) for name, h in hits.items() if h},
        }
    if (~scored).any():
        result["unscored"] = {"prompts": int((~scored).sum())}
    return result


def format_prompt_following(result: dict) -> list[str]:
    lines = ["  prompt following     prompts   class   attribute   (brightness, size)"]
    for group in GROUPS:
        if group in result:
            r = result[group]
            lines.append(f"    {group:<18} {r['prompts']:>7}   {r['class_accuracy']:.3f}   {r['attribute_accuracy']:.3f}       "
                         f"({r.get('brightness_accuracy', float('nan')):.3f}, {r.get('size_accuracy', float('nan')):.3f})")  # fmt: skip
    if "unscored" in result:
        lines.append(f"    {result['unscored']['prompts']} prompts name no Fashion-MNIST class and are not scored")
    return lines
