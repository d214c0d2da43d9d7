"""No dead settings: every field of Config and HostsFile is read by some code under rfs/.

The rule, simple on purpose: a field counts as read when a module under rfs/ other than
rfs/config.py has an attribute access `.<field name>` that loads a value (`cfg.env.budget_s`).
rfs/config.py does not count: it defines the fields, and its validation and serialisation read
every field without using any. The scan goes by name, so a field sharing a name with an attribute
used elsewhere (`name`, `device`) passes unchecked; a name no code loads is a setting that does
nothing, which is a typo-shaped trap for whoever sets it.
"""

from __future__ import annotations

import ast
import dataclasses
import typing

from rfs import ROOT
from rfs.config import Config
from rfs.hosts import HostsFile


def fields(cls: type, prefix: str) -> list[tuple[str, str]]:
    """(dotted path, field name) for every field, recursively through nested dataclasses and the
    values of dict-of-dataclass fields (hosts: dict[str, HostCfg])."""
    out = []
    for f, tp in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        path = f"{prefix}.{f.name}"
        out.append((path, f.name))
        inner = [tp, *typing.get_args(tp)]
        for t in inner:
            if dataclasses.is_dataclass(t):
                out += fields(t, path)
    return out


def loaded_attributes() -> set[str]:
    names = set()
    for path in (ROOT / "rfs").rglob("*.py"):
        if path == ROOT / "rfs" / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


# Read by config.load from the TOML table, before there is a Config: it picks the preset.
READ_WHILE_LOADING = {"Config.experiment.preset"}


def test_every_setting_is_read_by_some_code():
    read = loaded_attributes()
    dead = [path for path, name in fields(Config, "Config") + fields(HostsFile, "HostsFile") if name not in read and path not in READ_WHILE_LOADING]
    assert not dead, f"fields no module under rfs/ reads (remove them, or wire them up): {', '.join(dead)}"
