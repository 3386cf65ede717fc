"""The `tune` command: ls | cp | validate | run.

    tune ls                                    recipes and their configs (scanned from recipes/configs/)
    tune cp CONFIG DEST                        copy a built-in config to edit
    tune validate CONFIG [key=value ...]       check a config without running anything heavy
    tune run RECIPE --config CONFIG [key=value ...] [--nproc N]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tune.config import CONFIG_DIR, load_config, read_yaml, resolve_config_path
from tune.errors import ConfigError, TuneError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name: str):
    if name not in recipe_names():
        import difflib

        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (recipes: {', '.join(recipe_names())})")
    return importlib.import_module(f"recipes.{name}")


def config_summary(path: Path) -> tuple[str, str]:
    """(recipe, one-line description) of a config file: its `recipe` key and first comment line."""
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    description = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    recipe = str(read_yaml(path).get("recipe", "?"))
    return recipe, description


def load_recipe_config(config: str, overrides: list[str], recipe: str | None = None):
    """Resolve a config (file or built-in name), pick its recipe and build the validated config object."""
    if recipe:
        load_recipe(recipe)
    path = resolve_config_path(config)
    declared = read_yaml(path).get("recipe")
    name = recipe or declared
    if name is None:
        raise ConfigError(f"{path}: no 'recipe' key; add e.g. 'recipe: pretrain' or pass the recipe to tune run")
    if recipe and declared and recipe != declared:
        raise ConfigError(f"{path} is a {declared!r} config, not {recipe!r}; run: tune run {declared} --config {config}")
    module = load_recipe(name)
    cfg = load_config(module.CONFIG_CLASS, str(path), overrides)
    if hasattr(module, "validate"):
        module.validate(cfg)
    return module, cfg


def cmd_ls(args) -> int:
    rows: dict[str, list[tuple[str, str]]] = {name: [] for name in recipe_names()}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        recipe, description = config_summary(path)
        rows.setdefault(recipe, []).append((path.stem, description))
    width = max((len(c) for configs in rows.values() for c, _ in configs), default=10)
    for recipe, configs in rows.items():
        print(recipe)
        for name, description in configs:
            print(f"    {name:<{width}}  {description}")
    return 0


def cmd_cp(args) -> int:
    src = resolve_config_path(args.config)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.name} to {dest}")
    return 0


def cmd_validate(args) -> int:
    module, cfg = load_recipe_config(args.config, args.overrides)
    print(f"{args.config}: valid {module.__name__.split('.')[-1]} config")
    return 0


def cmd_run(args) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        load_recipe_config(args.config, args.overrides, args.recipe)  # fail fast, before starting N processes
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "-m", "tune.cli", "run", args.recipe, "--config", args.config, *args.overrides]
        return subprocess.call(command)
    module, cfg = load_recipe_config(args.config, args.overrides, args.recipe)
    module.run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune", description="Pretrain, fine-tune and distill GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and their built-in configs").set_defaults(func=cmd_ls)
    p = sub.add_parser("cp", help="copy a built-in config to a file you can edit")
    p.add_argument("config")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("validate", help="check a config (keys, types, values) without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("run", help="run a recipe")
    p.add_argument("recipe")
    p.add_argument("--config", required=True, help="a YAML file or the name of a built-in config")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (started with torch.distributed.run; works on CPU and GPUs)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 model.dropout=0.1")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (tune run pretrain --config demo train.lr=1e-3)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
