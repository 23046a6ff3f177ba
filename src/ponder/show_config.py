"""ponder config COMMAND [RECIPE] [overrides]: every setting a command reads, resolved, with what it does.

The recipes name the settings they change; the rest keep defaults that no file lists. This prints all of them as
YAML (a recipe that runs as it is: `ponder config train > my.yaml`), each beside the comment it has in the code
that defines it. The values are the recipe's and the overrides' where given; range checks are the command's own.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from functools import cache

import yaml

from ponder.config import resolved, to_dict

# command -> (module, recipe class)
KINDS = {
    "train": ("ponder.config", "RunConfig"),
    "sft": ("ponder.sft.config", "SFTConfig"),
    "sample": ("ponder.sample", "SampleConfig"),
    "distill": ("ponder.distill", "DistillConfig"),
    "pretrain": ("ponder.pretrain", "PretrainConfig"),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "config", help="print every setting of a command's recipe, with its default or value and what it does",
        description="Print the settings COMMAND reads, resolved from RECIPE and overrides (or the defaults alone), "
        "as YAML with each setting's comment: e.g. `ponder config train recipes/zero-tiny.yaml optim.lr=1e-4`.",
    )
    p.add_argument("kind", choices=list(KINDS), metavar="COMMAND", help=f"one of: {', '.join(KINDS)}")
    p.add_argument("recipe", nargs="?", help="YAML recipe (omit for the defaults)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=1e-4")
    p.set_defaults(func=lambda args: sys.stdout.write(annotated(resolve(args.kind, args.recipe, args.overrides))))


def resolve(kind: str, recipe: str | None, overrides: list[str]):
    """The command's recipe object; a recipe path given as `key=value` is taken as the first override."""
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]
    module, name = KINDS[kind]
    return resolved(recipe, overrides, getattr(importlib.import_module(module), name))


@cache
def notes(cls) -> dict[str, str]:
    """Each field's comment in the class's source: the comment lines right above it and the one after it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text[1:].strip())
            continue
        field = re.match(r"    (\w+)\s*:", line)
        if field:
            after = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[field.group(1)] = " ".join(above + [after]).strip()
        if not line.startswith("     "):  # (a field's default continued on the next lines keeps nothing above)
            above = []
    return out


def _flow(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 20, allow_unicode=True).strip()[1:-1]


def annotated(cfg, indent: int = 0) -> str:
    """The recipe object as YAML, each setting on one line with its comment; nested sections as blocks."""
    plain, pad, out = to_dict(cfg), " " * indent, []
    for f in dataclasses.fields(cfg):
        value, note = getattr(cfg, f.name), notes(type(cfg)).get(f.name, "")
        comment = f"  # {note}" if note else ""
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:{comment}\n{annotated(value, indent + 2)}")
        else:
            out.append(f"{pad}{f.name}: {_flow(plain[f.name])}{comment}\n")
    return "".join(out)
