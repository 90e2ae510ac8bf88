"""The `ditkit` command. Each subcommand's flags map one-to-one onto the fields of a frozen
config dataclass in ditkit.config (the field's `help` metadata is its --help text);
`--config FILE.toml` or `.json` (or, for train, a shipped recipe) supplies the same fields from a
file, and flags given on the command line win. Only ditkit.config is imported at parse time (no
torch), so --help and argument errors answer at once; the code that runs a command loads when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from typing import Any, Callable

from . import config
from .config import build_config, flag, leaf_fields, leaf_hints, unwrap_optional
from .config.files import RECIPE_COMMAND, RECIPES, load_config_file, recipe_names  # noqa: F401 (RECIPES: tests)
from .version import __version__

# name -> (config class, module and function that run it, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "sample": ("SampleConfig", "ditkit.generate", "run_sample", "sample a checkpoint to a PNG grid"),
    "sample-npz": ("SampleNpzConfig", "ditkit.generate", "run_sample_npz", "sample N images into an ADM-evaluator .npz (torchrun for many processes)"),
    "eval": ("EvalConfig", "ditkit.eval.evaluate", "run_eval", "FD-EffNet, accuracy; FID, sFID, IS, precision, recall with the Inception weights"),
    "train": ("TrainConfig", "ditkit.train", "run_train", "train a DiT (torchrun for many processes)"),
    "distill": ("DistillConfig", "ditkit.distill", "run_distill", "distil a flow teacher: guidance as an input, or few-step students (progressive, reflow, add, ladd)"),
    "extract": ("ExtractConfig", "ditkit.data.extract", "run_extract", "encode a dataset with the VAE into a latent store"),
    "flops": ("FlopsConfig", "ditkit.flops", "run_flops", "the paper's params / Gflops table for DiT configs"),
    "study": ("StudyConfig", "ditkit.study", "run_study", "train and score a grid of configs (size x patch, blocks, U-Net): the paper's scaling plots"),
    "serve": ("ServeConfig", "ditkit.serve", "run_serve", "a web page and JSON API over a checkpoint, batching requests that arrive together"),
    "dpo": ("DPOConfig", "ditkit.dpo", "run_dpo", "Diffusion-DPO with a LoRA: prefer the model's own samples that a judge (the classifier) ranks higher"),
    "export": ("ExportConfig", "ditkit.export", "run_export", "convert a checkpoint to a diffusers DiTPipeline folder, or any format to ditkit's"),
    "ema": ("EMAConfig", "ditkit.ema", "run_ema", "post-hoc EMA: the EMA of any length from a run's --ema-profiles snapshots, as a model folder"),
}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = leaf_hints(cls)
    for f in leaf_fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, _ = unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default is not None and default != () and tp is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple and f.metadata.get("repeat"):
            kwargs.update(action="append", type=typing.get_args(tp)[0])  # --prompt A --prompt B
        elif typing.get_origin(tp) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(tp)[0])
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag(f.name), *f.metadata.get("aliases", ()), **kwargs)


def parse_config(cls: type, args: argparse.Namespace) -> Any:
    values = load_config_file(args.config, args.command) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    return build_config(cls, values)


def _config_class(command: str) -> type:
    return getattr(config, COMMANDS[command][0])


def _runner(command: str) -> Callable:
    # The command's module loads when it runs, so --help and argument errors answer without torch.
    _, module_name, fn_name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module_name), fn_name)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> the command's parser, which answers for its own flags
    for name, (_, _, _, help_text) in COMMANDS.items():
        cls = _config_class(name)
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        recipes = f", or a recipe name ({', '.join(recipe_names())})" if name == RECIPE_COMMAND else ""
        p.add_argument("--config", help=f"TOML or JSON file with the same settings{recipes} (flags win)")
        add_config_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage, not the top-level one
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        cfg = parse_config(_config_class(args.command), args)
        result = _runner(args.command)(cfg)
    except KeyboardInterrupt:
        print("ditkit: interrupted; what was already written is kept.", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:
        # Bad input ends in one sentence, not a traceback.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ditkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
