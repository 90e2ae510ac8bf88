"""Captioned data (folders with .txt or metadata.jsonl, fashion-mnist-captions) and the
prompt-following evaluation that measures attributes as the captions were made."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.text.captions import (
    ATTRIBUTES,
    HELD_OUT,
    INK,
    FashionCaptions,
    build_captioned_dataset,
    caption_vocabulary,
    class_medians,
    measure,
    measure_attributes,
    parse_prompt,
)
from ditkit.data import item_seed
from ditkit.text.prompts import GROUPS, prompt_following, prompt_suite, read_prompts


def test_measure_by_hand():
    images = np.zeros((2, 32, 32), np.uint8)
    images[0, 4:8, 4:9] = 200  # 20 garment pixels of 200
    images[1, 10:20, 10:20] = 100
    images[1, 0, 0] = INK  # not above the ink threshold: background
    m = measure(images[..., None])
    assert m["size"].tolist() == [20, 100] and m["brightness"].tolist() == [200, 100]
    medians = class_medians()
    coat = 4
    bright = np.full((1, 32, 32), 0, np.uint8)
    bright[0, :20, :] = 255  # 640 white pixels: light and large for a coat
    assert {k: v.item() for k, v in measure_attributes(bright, np.array([coat])).items()} == {"brightness": 1, "size": 1}
    assert medians["brightness"][coat] < 255 and medians["size"][coat] < 640


@pytest.fixture(scope="module")
def fashion_train():
    return FashionCaptions(flip=False)


def test_fashion_captions_hold_pairs_out_and_say_what_pixels_show(fashion_train):
    ds = fashion_train
    test = FashionCaptions(split="test", flip=False)
    for data, present in ((ds, False), (test, True)):
        attrs = measure_attributes(data.images.numpy(), data.classes)
        for cls, name, word in HELD_OUT:
            hits = (data.classes == cls) & (attrs[name] == ATTRIBUTES[name].index(word))
            assert hits.any() == present
    assert len(ds) < 60_000 and len(test) == 10_000
    assert ds.captions[0] == "" and ds.captions == caption_vocabulary()
    attrs = measure_attributes(ds.images.numpy(), ds.classes)
    for i in range(0, len(ds), 997):
        for epoch in range(3):
            x, cid = ds._item(i, item_seed(0, epoch, i))
            text = ds.captions[cid]
            cls, words = parse_prompt(text)
            assert cls == ds.classes[i], text
            for name, word in words.items():  # every attribute word a caption says is measured true
                assert ATTRIBUTES[name].index(word) == attrs[name][i], (text, i)
            assert x.shape == (1, 32, 32)
    sample_captions = {ds.captions[ds._item(i, item_seed(0, e, i))[1]] for i in range(50) for e in range(4)}
    assert any("photo of" in c for c in sample_captions) and any("," in c for c in sample_captions)
    assert any(len(parse_prompt(c)[1]) < 2 for c in sample_captions)  # attribute words are sometimes left out


def test_parse_prompt():
    assert parse_prompt("A photo of a small DARK t-shirt") == (0, {"brightness": "dark", "size": "small"})
    assert parse_prompt("here is a shirt") == (6, {})
    assert parse_prompt("two light sneakers") == (7, {"brightness": "light"})
    assert parse_prompt("a pair of trousers, large") == (1, {"size": "large"})
    assert parse_prompt("a cat") == (None, {})


def test_prompt_following_on_real_images(fashion_train):
    """Real test images with their true captions score attribute accuracy 1.0; with the opposite
    words 0.0; the class accuracy is whatever the given predictions say."""
    test = FashionCaptions(split="test", flip=False)
    idx = np.arange(0, 10_000, 25)
    framed = np.pad(test.images.numpy()[idx], ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 -> 32 px, as samples are
    prompts = np.array([test.caption_of(i, item_seed(1, 0, int(i))) for i in idx])
    classes = test.classes[idx]
    predicted = classes.copy()
    predicted[:40] = (predicted[:40] + 1) % 10  # 40 wrong of 400
    r = prompt_following(framed, prompts, predicted)
    scored = sum(r[g]["prompts"] for g in GROUPS if g in r)
    assert scored == len(idx) and r["seen"]["attribute_accuracy"] == 1.0 and r["held-out"]["attribute_accuracy"] == 1.0
    wrong = sum((r[g]["class_accuracy"] * r[g]["prompts"]) for g in r)
    assert round(wrong) == len(idx) - 40
    flipped = np.array([p.replace("dark", "DARK").replace("light", "dark").replace("DARK", "light") for p in prompts])
    r = prompt_following(framed, flipped, predicted)
    assert all(r[g].get("brightness_accuracy", 0.0) == 0.0 for g in GROUPS if g in r)


def test_prompt_suites():
    for group in GROUPS:
        prompts = prompt_suite(group, n=60)
        assert len(prompts) == 60 and prompts == prompt_suite(group, n=60)
        parsed = [parse_prompt(p) for p in prompts]
        assert all(cls is not None and len(words) == 2 for cls, words in parsed)
        vocabulary = set(caption_vocabulary())
        held = [any(c == cls and words[name] == w for cls, name, w in HELD_OUT) for c, words in parsed]
        assert all(held) if group == "held-out" else not any(held)
        assert all(p in vocabulary for p in prompts) == (group == "seen")
    mixed = read_prompts("fashion-mnist-captions")
    assert mixed[:3] == [prompt_suite(g)[0] for g in GROUPS]
    with pytest.raises(ValueError, match="unknown prompt suite"):
        read_prompts("fashion-mnist-captions:other")


def write_image(path, value):
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_captioned_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "a.png", 10)
    (tmp_path / "a.txt").write_text("a dark square\n")
    write_image(tmp_path / "sub" / "b.png", 250)
    write_image(tmp_path / "c.png", 128)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.png", "text": "a light square"}) + "\n"
                                              + json.dumps({"file_name": "c.png", "text": "a dark square"}) + "\n")  # fmt: skip
    ds = build_captioned_dataset(tmp_path, image_size=8, flip=False)
    assert ds.captions == ("", "a dark square", "a light square") and len(ds) == 3
    items = {ds.samples[i][0]: ds[i] for i in range(3)}
    x, cid = items[str(tmp_path / "sub" / "b.png")]
    assert ds.captions[cid] == "a light square" and torch.allclose(x, torch.full((3, 8, 8), 250 / 127.5 - 1))
    assert ds.captions[items[str(tmp_path / "c.png")][1]] == "a dark square"

    write_image(tmp_path / "d.png", 0)
    with pytest.raises(ValueError, match=r"1 of 4 images in .* have no caption \(the first: .*d.png\)"):
        build_captioned_dataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 of .*metadata.jsonl is not a JSON object"):
        build_captioned_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder of captioned images nor fashion-mnist-captions"):
        build_captioned_dataset("fashion-mnist")


def test_prompt_matched_real_images_fit_their_prompts():
    """bench/prompt_matched_real.py's floor: each real image has the class and the measured
    attributes its prompt names, prompts cycle as in sample-npz, and no image is drawn twice."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("prompt_matched_real", Path(__file__).parents[1] / "bench" / "prompt_matched_real.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompts = ["a small dark coat", "a large light sneaker", "a light pair of trousers"]
    images, used = bench.matched_images(prompts, 9, seed=0)
    assert list(used) == prompts * 3
    assert len({im.tobytes() for im in images}) == 9
    classes = np.array([parse_prompt(p)[0] for p in used])
    measured = measure_attributes(images, classes)
    for i, p in enumerate(used):
        for name, word in parse_prompt(p)[1].items():
            assert measured[name][i] == ATTRIBUTES[name].index(word), (p, name)
    with pytest.raises(ValueError, match="names no Fashion-MNIST class"):
        bench.matched_images(["a photo of a cat"], 1, seed=0)
