"""docs/training.md's key reference, generated from the schema and conf/'s values.

Each group's table lists every key with its type, range and one-line doc from
:mod:`syncbn.training.config.schema` and its value in each of the group's yaml files (a choice
group such as ``optim`` has one column per choice). Regenerate after changing a key::

    python -m syncbn.training.config.reference --write   # rewrites the marked section

tests/training/test_config.py fails while the section is stale, or while a yaml file and its
schema disagree on the keys.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import yaml

from . import schema

ROOT = Path(__file__).resolve().parents[3]
CONF = ROOT / "conf"
DOC = ROOT / "docs" / "training.md"
BEGIN = "<!-- BEGIN key reference: `python -m syncbn.training.config.reference --write` -->"
END = "<!-- END key reference -->"
GROUPS = ["trainer", "optim", "norm", "data", "loader", "logger", "dist", "task"]


def group_files(group: str) -> dict[str, tuple[type, dict]]:
    """``{choice: (schema class, values)}`` for each yaml file of ``group``."""
    out = {}
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        if group == "task":  # a global package: the task's own keys sit under ``task:``
            out[path.stem] = (schema.TaskConfig, values["task"])
            continue
        name = next(d for d in values.pop("defaults") if str(d).startswith("schema"))
        out[path.stem] = (schema.GROUPS[(group, name)], values)
    return out


def _type(annotation: str) -> str:
    hints = {"None": "null"}
    text = str(annotation)
    for old, new in hints.items():
        text = text.replace(old, new)
    return text


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def table(group: str) -> list[str]:
    files = group_files(group)
    choices = list(files)
    keys: dict[str, object] = {}  # key -> its dataclass field, in schema order
    for cls, _ in files.values():
        for f in fields(cls):
            keys.setdefault(f.name, f)
    head = ["key", "type", *(f"`{group}={c}`" if len(choices) > 1 else "default" for c in choices)]
    lines = [
        f"### `{group}`",
        "",
        "| " + " | ".join([*head, "range", "what it does"]) + " |",
        "|" + "---|" * (len(head) + 2),
    ]
    for name, f in keys.items():
        values = [
            f"`{_value(v[name])}`" if name in v else "" for _, v in (files[c] for c in choices)
        ]
        bound = schema.describe_range(f.metadata)
        cells = [f"`{group}.{name}`", f"`{_type(f.type)}`", *values, bound, f.metadata["doc"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, ""]


def reference() -> str:
    lines = [BEGIN, ""]
    for group in GROUPS:
        lines += table(group)
    return "\n".join([*lines, END])


def rewrite(text: str) -> str:
    """``text`` with its marked section replaced by the current reference."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + reference() + text[end:]


def main(argv: list[str]) -> None:
    if argv == ["--write"]:
        DOC.write_text(rewrite(DOC.read_text()))
    else:
        print(reference())


if __name__ == "__main__":
    main(sys.argv[1:])
