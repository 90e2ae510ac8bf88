"""The command line as a tool: --help and flag errors without torch, --version, the public names
loaded on first use, recipes for training only, the paper's block names in every command."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ditkit
from ditkit.cli import RECIPES, _config_class, main, make_parser, parse_config
from ditkit.config import DiTConfig, StudyConfig, TrainConfig

ROOT = Path(__file__).parent.parent
PUBLIC = ("DiT", "DiTConfig", "PRESETS", "GaussianDiffusion", "FlowMatching", "ObjectiveConfig", "sample", "SAMPLERS", "cfg_model", "space_timesteps",
          "MMDiT", "MMDiTConfig", "MMDIT_PRESETS", "TextCondition", "UViT", "UViTConfig", "UVIT_PRESETS",
          "VideoDiT", "VideoDiTConfig", "VIDEO_PRESETS")  # fmt: skip


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter with this checkout first on the path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_and_flag_errors_do_not_import_torch():
    """--help and argument errors answer before torch (seconds to import) is loaded."""
    code = """
import contextlib, io, sys
from ditkit.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    for argv in (["--help"], ["sample", "--help"], ["--version"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, argv
with contextlib.redirect_stderr(io.StringIO()) as err:
    assert main(["sample", "--num-sampling-steps", "0"]) == 2
    assert main(["flops", "--model", "DiT-S/3"]) == 2
    assert main(["eval"]) == 2
import ditkit
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "diffusers", "PIL")), err.getvalue().count("error:"))
"""
    run = fresh_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "3"]


def test_public_names_load_on_first_use():
    run = fresh_python(f"import sys, ditkit; print('torch' in sys.modules, ditkit.DiT.__name__, sorted({PUBLIC!r}) == sorted(ditkit.__all__), 'torch' in sys.modules)")
    assert run.stdout.split() == ["False", "DiT", "True", "True"], run.stderr
    for name in PUBLIC:
        assert getattr(ditkit, name) is not None and name in dir(ditkit)
    assert ditkit.DiT.from_preset("DiT-S/8", input_size=8).config == DiTConfig.from_preset("DiT-S/8", input_size=8)
    with pytest.raises(AttributeError, match="no attribute 'Dit'"):
        ditkit.Dit  # noqa: B018


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"ditkit {ditkit.__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]  # one source: the package's __version__
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ditkit.__version__"}


def parsed(*argv):
    args = make_parser().parse_args(list(argv))
    return parse_config(_config_class(args.command), args)


def test_recipes_are_for_training(capsys):
    cfg = parsed("train", "--config", "fmnist-cpu", "--max-steps", "5")
    assert (cfg.model, cfg.hidden_size, cfg.max_steps) == ("DiT-S/4", 192, 5)
    for command in ("sample", "sample-npz", "flops", "eval", "study"):
        assert main([command, "--config", "fmnist-cpu"]) == 2
        err = capsys.readouterr().err
        assert f"ditkit {command}: error: fmnist-cpu is a training recipe: use it with ditkit train --config fmnist-cpu" in err
    for command, helps_recipes in (("train", True), ("sample", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = "".join(capsys.readouterr().out.split())  # whatever the terminal width (argparse wraps at hyphens too)
        names = ",".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
        assert "fmnist-cpu" in names and ("orarecipename(" + names + ")" in help_text) == helps_recipes


def test_every_shipped_recipe_is_a_valid_training_config():
    """A recipe is read when a user names it: each one shipped parses and passes the config's checks."""
    for recipe in sorted(RECIPES.glob("*.toml")):
        cfg = parsed("train", "--config", recipe.stem)
        assert isinstance(cfg, TrainConfig) and cfg.max_steps > 0, recipe.stem
    five, fast = parsed("train", "--config", "fmnist-5min"), parsed("train", "--config", "fmnist-fast")
    assert (five.max_minutes, five.max_steps, five.model_config(10, 32, 1)) == (5, 2800, fast.model_config(10, 32, 1))


def test_paper_block_names_in_every_command():
    aliases = {"adaLN-Zero": "adaln_zero", "adaLN": "adaln", "cross-attention": "cross_attn", "in-context": "in_context"}
    for alias, name in aliases.items():
        train = parsed("train", "--block", alias)
        assert isinstance(train, TrainConfig) and train.model_config(10, 32, 1).block == name
        assert ditkit.DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, block=alias).config.block == name
    study = parsed("study", "--blocks", *aliases)
    assert isinstance(study, StudyConfig) and study.blocks == tuple(aliases.values())
    assert parsed("flops", "--block", *aliases).block == tuple(aliases.values())
