"""Command-line flags from config dataclasses: a field's docstring is its --help, its type and
`setting` rules its type and choices. The main commands (nhle.cli.commands.add_field_flags) and
the benchmarks (nhle.bench.configs) build their flags here. Pure argparse: no torch.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields

from nhle.core.config import field_docs


class Deprecated(argparse.Action):
    """An old spelling of a flag: it still works, stores into the new flag's value and says on
    stderr what to use instead."""

    def __init__(self, option_strings, dest, use: str, **kwargs):
        super().__init__(option_strings, dest, help=f"deprecated: use {use}", **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"nhle: {option_string} is deprecated: use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def flag_options(cls, name: str) -> dict:
    """argparse options of field `name` of config class `cls`: help, and type, choices or a
    store_true action (no default: the caller's)."""
    hint = typing.get_type_hints(cls)[name]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # int | None -> int
    rules = next(f.metadata for f in fields(cls) if f.name == name)
    options = {"help": field_docs(cls)[name]}
    if kind is bool:
        options["action"] = "store_true"
    elif typing.get_origin(kind) is tuple:
        options["type"] = float_list
    elif "choices" in rules and "also" not in rules:  # with `also`, other values fit too
        options["choices"] = rules["choices"]
    else:
        options["type"] = kind
    return options


def add_config_flags(parser: argparse.ArgumentParser, cls, renamed: dict[str, str] | None = None) -> None:
    """A --flag per field of config class `cls`, defaulting to the field's default. A bool that
    defaults to True is switched off by --no-FIELD. `renamed`: {old flag: field}, spellings still
    taken, each saying what to use instead."""
    for f in fields(cls):
        options = flag_options(cls, f.name)
        if options.get("action") == "store_true" and f.default is True:
            parser.add_argument(flag_name(f"no_{f.name}"), dest=f.name, action="store_false", help=options["help"])
            continue
        if "action" not in options and f.default is not None:
            options["help"] += " (default: %(default)s)"
        parser.add_argument(flag_name(f.name), dest=f.name, default=f.default, **options)
    for old, name in (renamed or {}).items():
        parser.add_argument(old, dest=name, action=Deprecated, use=flag_name(name))


def config_from(cls, args: argparse.Namespace):
    """The config of `cls` from parsed flags, checked like any section (a bad value names its field)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
