"""Captioned images for text-to-image training, and the measured attributes of fashion-mnist-captions.

- `CaptionedFolder`: any folder of images with a caption per image, `name.txt` beside `name.png` or
  a line `{"file_name": ..., "text": ...}` of a `metadata.jsonl` in the folder (the Hugging Face
  image-folder convention).
- `FashionCaptions` (`fashion-mnist-captions`): Fashion-MNIST captioned from its label and two
  attributes measured from its pixels, brightness (dark / light) and size (small / large), each
  split at its class's median on the training split, in several phrasings. The images of a few
  (class, attribute) pairs are left out of training (`HELD_OUT`), so that prompts such as
  "a light pair of trousers" test composition; evaluation measures the attributes of generated
  images with the same function (`measure_attributes`).

A captioned dataset yields (x, caption id), ids indexing `dataset.captions`, whose row 0 is the
empty prompt (the null condition); the trainer turns ids into the captions' cached embeddings.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from ..data import NAMED, OFFICIAL_IMAGE_SIZE, DitDataset, ImageFolderDataset, NamedDataset, walk_images

# -- attributes measured from pixels ------------------------------------------------------------
INK = 32  # a pixel (of 255) brighter than this belongs to the garment; the background is 0
ATTRIBUTES = {"brightness": ("dark", "light"), "size": ("small", "large")}  # below / above the class median
# Caption nouns of the Fashion-MNIST classes, in label order.
NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# (class, attribute, word) whose images are left out of training: prompts naming them test composition.
HELD_OUT = ((1, "brightness", "light"), (7, "brightness", "dark"), (8, "size", "large"), (3, "size", "small"))
WORD_DROPOUT = 0.25  # each attribute word is left out of a training caption with this probability

# Phrasings: (article + adjectives + noun, "and"-joined adjectives) -> caption. The unseen ones are
# never used in training, for evaluation only.
SEEN_PHRASINGS = ("{a}", "a photo of {a}", "{bare}", "{one}, {words}")
UNSEEN_PHRASINGS = ("a picture of {a}", "{one} that is {words}", "here is {a}")


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Attribute values of gray uint8 images (N, H, W) or (N, H, W, 1): brightness = mean value of
    the garment's pixels, size = their count (independent of the black frame around them)."""
    images = images.reshape(images.shape[0], images.shape[1], images.shape[2]).astype(np.float32)
    ink = images > INK
    count = ink.sum((1, 2))
    return {"brightness": (images * ink).sum((1, 2)) / np.maximum(count, 1), "size": count.astype(np.float32)}


@functools.lru_cache(maxsize=1)
def class_medians() -> dict[str, np.ndarray]:
    """Per-class median of each attribute on the Fashion-MNIST training split: the caption thresholds."""
    images, labels = NAMED["fashion-mnist"].load("train")
    values = measure(images)
    return {name: np.array([np.median(v[labels == c]) for c in range(len(NOUNS))]) for name, v in values.items()}


def measure_attributes(images: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """0/1 per image and attribute (0 = dark / small, 1 = light / large), against the medians of the
    given classes: how the captions were made, and how generated images are judged."""
    medians = class_medians()
    return {name: (v > medians[name][classes]).astype(np.int64) for name, v in measure(images).items()}


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(cls: int, words: dict[str, str | None], phrasing: str) -> str:
    """One caption: class `cls`, attribute words such as {"size": "small", "brightness": None}."""
    chosen = [words[name] for name in ("size", "brightness") if words.get(name)]  # "a small dark coat"
    noun = NOUNS[cls]
    if "{words}" in phrasing and not chosen:
        phrasing = "{a}"
    bare = " ".join([*chosen, noun])
    return phrasing.format(a=article(bare), bare=bare, one=article(noun), words=" and ".join(chosen))


def held_out(cls: int, words: dict[str, str | None]) -> bool:
    return any(cls == c and words.get(name) == word for c, name, word in HELD_OUT)


@functools.lru_cache(maxsize=2)
def caption_vocabulary(with_held_out: bool = False) -> tuple[str, ...]:
    """Every training caption of fashion-mnist-captions (and those of the held-out pairs, which
    only the test split has), after the empty prompt (id 0)."""
    found = {""}
    for cls in range(len(NOUNS)):
        for size in (None, *ATTRIBUTES["size"]):
            for bright in (None, *ATTRIBUTES["brightness"]):
                words = {"size": size, "brightness": bright}
                if with_held_out or not held_out(cls, words):
                    found.update(caption(cls, words, p) for p in SEEN_PHRASINGS)
    return ("", *sorted(found - {""}))


def parse_prompt(text: str) -> tuple[int | None, dict[str, str]]:
    """(class, {attribute: word}) named in a prompt, None / missing where it names none."""
    text = text.lower()
    cls = None
    for c in sorted(range(len(NOUNS)), key=lambda c: -len(NOUNS[c])):  # "t-shirt" before "shirt"
        noun = {1: "trousers"}.get(c, NOUNS[c])
        if re.search(rf"(?<![\w-]){re.escape(noun)}s?\b", text):
            cls = c
            break
    words = {name: w for name, pair in ATTRIBUTES.items() for w in pair if re.search(rf"\b{w}\b", text)}
    return cls, words


# -- datasets -----------------------------------------------------------------------------------
class FashionCaptions(NamedDataset):
    """Fashion-MNIST with captions (see the module doc). The phrasing and which attribute words a
    caption keeps are drawn per item and epoch from the item's seed, like the flips."""

    def __init__(self, image_size: int | None = None, channels: int = 1, split: str = "train", flip: bool = True, seed: int = 0):
        super().__init__("fashion-mnist", image_size, channels, split=split, flip=flip, seed=seed)
        self.source = f"fashion-mnist-captions ({split})"
        self.classes = self.labels
        attrs = measure_attributes(self.images.numpy(), self.classes)
        self.words = {name: np.array(ATTRIBUTES[name])[attrs[name]] for name in ATTRIBUTES}
        keep = np.array([not held_out(c, {n: self.words[n][i] for n in ATTRIBUTES}) for i, c in enumerate(self.classes)])
        if split == "train":  # the held-out pairs are absent from training, present in the test split
            self.images, self.classes = self.images[keep], self.classes[keep]
            self.words = {n: w[keep] for n, w in self.words.items()}
        self.captions = caption_vocabulary(with_held_out=split != "train")
        self._ids = {text: i for i, text in enumerate(self.captions)}
        self.labels = np.zeros(len(self.classes), dtype=np.int64)  # caption ids are drawn per item
        self.num_classes = len(self.captions)
        # Training sample grids: each class dark and light, held-out pairs included.
        self.demo_prompts = tuple(caption(c, {"brightness": w}, "{a}") for w in ATTRIBUTES["brightness"] for c in range(len(NOUNS)))

    def caption_of(self, index: int, rand: int) -> str:
        r = rand >> 1  # the lowest bit is the flip
        phrasing = SEEN_PHRASINGS[r % len(SEEN_PHRASINGS)]
        r //= len(SEEN_PHRASINGS)
        words = {}
        for name in ATTRIBUTES:
            keep = (r % 1000) >= WORD_DROPOUT * 1000
            r //= 1000
            words[name] = self.words[name][index] if keep else None
        return caption(int(self.classes[index]), words, phrasing)

    def _item(self, index: int, rand: int):
        x, _ = super()._item(index, rand)
        return x, self._ids[self.caption_of(index, rand)]


class CaptionedFolder(ImageFolderDataset):
    """Every image under `root` (any depth) with its caption: `metadata.jsonl` (`file_name`, `text`)
    where it lists the image, else the `.txt` of the same name beside it."""

    def __init__(self, root: str | Path, image_size: int | None = None, channels: int = 3, flip: bool = True,
                 on_bad_image: str = "skip", seed: int = 0):  # fmt: skip
        DitDataset.__init__(self, flip, seed)  # ImageFolderDataset's reading, our own file list
        self.root = Path(root)
        self.source = f"{self.root} (captioned)"
        self.image_size = image_size or OFFICIAL_IMAGE_SIZE
        self.channels, self.mode, self.on_bad_image = channels, {3: "RGB", 1: "L"}[channels], on_bad_image
        texts = read_captions(self.root)
        self.captions = ("", *sorted(set(texts.values()) - {""}))
        ids = {text: i for i, text in enumerate(self.captions)}
        self.samples = [(path, ids[text]) for path, text in sorted(texts.items())]
        self.labels = np.array([i for _, i in self.samples], dtype=np.int64)
        self.class_names, self.num_classes = (), len(self.captions)
        self._warned: set[str] = set()


def read_captions(root: Path) -> dict[str, str]:
    """{image path: caption} for every image under `root` that has one; an image whose caption is
    empty or null is left out, with a count on stderr (an empty caption is the null condition, not a
    description); one sentence if any image has no caption at all."""
    images = walk_images(root)
    if not images:
        raise ValueError(f"{root} holds no images; put images with a caption each (name.txt beside them or metadata.jsonl) in it.")
    listed: dict[str, str | None] = {}
    meta = root / "metadata.jsonl"
    if meta.exists():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
                if text is not None and not isinstance(text, str):
                    raise TypeError
                listed[os.path.normpath(root / row["file_name"])] = text
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"line {n} of {meta} is not a JSON object with file_name and text (a string); fix or remove it.") from None
    texts, missing, empty = {}, [], []
    for path in images:
        txt = Path(path).with_suffix(".txt")
        if os.path.normpath(path) in listed:
            text = listed[os.path.normpath(path)]
        elif txt.exists():
            text = txt.read_text()
        else:
            missing.append(path)
            continue
        if text is None or not text.strip():
            empty.append(path)
        else:
            texts[path] = text.strip()
    if missing:
        raise ValueError(f"{len(missing)} of {len(images)} images in {root} have no caption (the first: {missing[0]}); "
                         "add a .txt of the same name beside each, or a metadata.jsonl line with its file_name and text.")  # fmt: skip
    if not texts:
        raise ValueError(f"none of the {len(images)} images in {root} has a caption: each one's is empty or null; write what each image shows.")
    if empty:
        print(f"skipping {len(empty)} of {len(images)} images in {root} with an empty or null caption (the first: {empty[0]}); "
              "write what they show to train on them.", file=sys.stderr, flush=True)  # fmt: skip
    return texts


CAPTIONED_NAMES = ("fashion-mnist-captions",)


def build_captioned_dataset(data_path: str | Path, image_size: int | None = None, channels: int | None = None,
                            split: str = "train", flip: bool = True, on_bad_image: str = "skip", seed: int = 0):  # fmt: skip
    """A captioned dataset: an image folder with captions, or fashion-mnist-captions."""
    path = Path(data_path)
    if path.is_dir():
        return CaptionedFolder(path, image_size, channels or 3, flip=flip, on_bad_image=on_bad_image, seed=seed)
    if str(data_path) == "fashion-mnist-captions":
        return FashionCaptions(image_size, channels or 1, split=split, flip=flip, seed=seed)
    raise FileNotFoundError(f"data path {data_path} is neither a folder of captioned images nor fashion-mnist-captions; "
                            "pass one of those for a text-to-image model.")  # fmt: skip
