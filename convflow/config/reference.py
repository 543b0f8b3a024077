"""The configuration reference (docs/configuration.md), rendered from the pipelines.yaml models.

    python -m convflow.config.reference [--check] [--output PATH]

One section per model, in the order they nest under PipelineSpec, each a table of its fields
(type, default, description) taken from the models and their `Field(description=...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from convflow.config.schema import PipelineSpec

OUTPUT = Path("docs/configuration.md")
REGENERATE = ".venv/bin/python -m convflow.config.reference"
# Each bound that pydantic keeps in a field's metadata, and how the reference writes it.
BOUNDS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}", "min_length": "at least {} item(s)"}
INTRO = f"""\
# Configuration reference

<!-- Generated from convflow/config/schema.py by `{REGENERATE}`; do not edit by hand. -->

A pipelines file (`pipelines.yaml`) has two keys: `pipelines`, a mapping from pipeline names to
[PipelineSpec](#pipelinespec)s, and `defaults`, any part of a PipelineSpec, deep-merged under every
pipeline, so that a pipeline states only what differs. Relative paths resolve against the file's
folder. A key that is not listed here is a mistake; `convflow validate FILE` lists every mistake
with its path and value. Where: the place of each model in a pipeline, `<key>` standing for a
key of a mapping and `[]` for each item of a list.
"""


def render_reference(root: type[BaseModel] = PipelineSpec) -> str:
    """The Markdown reference of `root` and every model nested in it.

    Returns:
        The text of docs/configuration.md.
    """
    places = _places(root, "pipelines.<name>", {})
    sections = ["\n".join(_section(model, where)) for model, where in places.items()]
    return INTRO + "\n" + "\n".join(sections)


def _places(model: type[BaseModel], where: str, found: dict[type[BaseModel], list[str]]) -> dict:
    """Every model under `model` (itself first, then depth first in field order), with the places
    it has in a pipeline."""
    found.setdefault(model, []).append(where)
    if len(found[model]) == 1:  # a model met again keeps its first place in the order
        for name, field in model.model_fields.items():
            for nested, suffix in _nested_models(field.annotation):
                _places(nested, f"{where}.{field.alias or name}{suffix}", found)
    return found


def _nested_models(annotation: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models an annotation holds, each with how it sits in it ([] a list's items, .<key> a
    mapping's values)."""
    if _is_model(annotation):
        yield annotation, suffix
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        yield from _nested_models(args[0], suffix + "[]")
    elif origin is dict:
        yield from _nested_models(args[1], suffix + ".<key>")
    else:
        for arg in args:
            yield from _nested_models(arg, suffix)


def _section(model: type[BaseModel], where: list[str]) -> list[str]:
    lines = [f"## {model.__name__}", ""]
    doc = model.__dict__.get("__doc__")
    if doc:
        lines += [_prose(doc), ""]
    lines += ["Where: " + ", ".join(f"`{place}`" for place in where), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    lines += [_row(field.alias or name, field) for name, field in model.model_fields.items()]
    return lines + [""]


def _row(name: str, field: FieldInfo) -> str:
    bounds = [BOUNDS[key].format(value) for meta in field.metadata for key, value in _bounds(meta)]
    kind = ", ".join([_type_name(field.annotation), *bounds])
    cells = [f"`{name}`", kind, _default(field), _prose(field.description or "")]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _prose(text: str) -> str:
    """`text` on one line, its <placeholders> shown rather than taken for HTML outside code spans."""
    parts = " ".join(text.split()).split("`")  # odd-numbered parts lie inside code spans
    return "`".join(part if index % 2 else part.replace("<", "&lt;") for index, part in enumerate(parts))


def _bounds(meta: object) -> Iterator[tuple[str, object]]:
    for key in BOUNDS:
        value = getattr(meta, key, None)
        if value is not None:
            yield key, value


def _type_name(annotation: Any) -> str:
    """A type as a pipelines file writes it: YAML's null, lists and mappings; models linked."""
    if _is_model(annotation):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin is list:
        item = _type_name(args[0])
        return f"list of ({item})" if " | " in item else f"list of {item}"
    if origin is dict:
        return f"{{{_type_name(args[0])}: {_type_name(args[1])}}}"
    return annotation.__name__


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    if value is None:
        return "unset"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with --check say whether the written one is stale (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the schema's")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"the file (default: {OUTPUT})")
    args = parser.parse_args(argv)
    text = render_reference()
    if not args.check:
        args.output.write_text(text)
        return 0
    written = args.output.read_text() if args.output.exists() else None
    if written == text:
        return 0
    print(
        f"{args.output} is stale: it is not what convflow/config/schema.py renders; regenerate it "
        f"with `{REGENERATE}` and commit it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
