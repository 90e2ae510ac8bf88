"""Settings from files: a TOML or JSON file of a command's fields, or a training recipe shipped with
ditkit (ditkit/recipes/NAME.toml) by name."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

RECIPES = Path(__file__).parent.parent / "recipes"
RECIPE_COMMAND = "train"  # the shipped recipes are training settings


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def load_config_file(path: str | Path, command: str = RECIPE_COMMAND) -> dict:
    """Settings from a TOML/JSON file, or (for `ditkit train`) a recipe shipped with ditkit by name."""
    path = Path(path)
    recipe = RECIPES / f"{path}.toml"
    if not path.exists() and recipe.exists():
        if command != RECIPE_COMMAND:
            raise ValueError(f"{path} is a training recipe: use it with ditkit {RECIPE_COMMAND} --config {path}, and give ditkit {command} "
                             "its flags or a .toml file of its own settings.")  # fmt: skip
        path = recipe
    if not path.exists():
        known = f" or a recipe name ({', '.join(recipe_names())})" if command == RECIPE_COMMAND else ""
        raise FileNotFoundError(f"config file {path} does not exist; pass a .toml or .json file{known}.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}.") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
