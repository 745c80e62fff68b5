"""The config reference (every key, its type, default and meaning), generated from the schema."""

from __future__ import annotations

from typing import Any, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gradleak.attacks.optimisation import PRESET_SOURCES, PRESETS, AttackSettings
from gradleak.experiments.config import ExperimentConfig, model_variants


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("NoneType", "null").replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "see below"
    return f"`{field.default!r}`".replace("None", "null")


def _section(model: type[BaseModel], prefix: str, title: str, out: list[str]) -> None:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        subs = model_variants(field.annotation)
        if subs:
            listed = get_origin(field.annotation) is list
            nested.append((f"{key}.N" if listed else key, subs, field.description or ""))
            continue
        default = _default(field)
        if field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        rows.append(
            f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |"
        )
    out += [f"## {title}", "", (model.__doc__ or "").strip().split("\n")[0], ""]
    if rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for key, subs, description in nested:
        if len(subs) == 1:
            _section(subs[0], f"{key}.", f"`{key}`: {description}", out)
            continue
        tag = next(k for k in subs[0].model_fields if k in ("source", "scheme", "name"))
        out += [f"## `{key}`: {description}", "", f"Chosen by `{key}.{tag}`:", ""]
        for sub in subs:
            value = sub.model_fields[tag].default
            _section(sub, f"{key}.", f"`{key}.{tag}: {value}`", out)


def config_reference() -> str:
    """Markdown for docs/config.md."""
    out = [
        "# Experiment config reference",
        "",
        "Generated from the schema by `gradleak config-reference`; do not edit by hand.",
        "An experiment is a YAML file; unknown keys are errors. Any key can be overridden on the",
        "command line with `--set key=value` (the value is read as YAML; list items by index, e.g.",
        "`--set partition.clients.0.batch_size=2`).",
        "",
    ]
    _section(ExperimentConfig, "", "Top level", out)
    names = ", ".join(f"`{n}`" for n in PRESETS.names())
    out += [
        "# Attack settings",
        "",
        f"Every optimisation preset ({names}) is a set of these values; change any of them with",
        "`audit.attack` in a config or `gradleak attack --preset NAME --set key=value`. Each",
        "preset is also registered as `NAME-adaptive`: the same settings, adapted to the defences",
        "the server knows of (see `audit.adaptive`).",
        "",
    ]
    _section(AttackSettings, "", "Settings", out)
    out += ["## Presets", "", preset_table()]
    _other_attacks(out)
    return "\n".join(out).rstrip() + "\n"


def _other_attacks(out: list[str]) -> None:
    """The settings of every registered attack that is not an optimisation preset (a modality's
    own, such as text's), each its own table."""
    from gradleak.attacks.base import ADAPTIVE, ATTACKS
    from gradleak.attacks.registry import load_attacks

    load_attacks()
    others = [n for n in ATTACKS.names() if n.removesuffix(ADAPTIVE) not in PRESETS]
    if not others:
        return
    out += [
        "# Other attacks",
        "",
        "Registered by modalities; change their settings the same way (`audit.attack`, `--set`).",
        "",
    ]
    for name in others:
        factory = ATTACKS.get(name)
        settings = getattr(factory(), "settings", None)
        out += [f"## `{name}`", "", " ".join((factory.__doc__ or "").split()), ""]
        if isinstance(settings, BaseModel):
            _section(type(settings), "", f"`{name}` settings", out)


def preset_table() -> str:
    """The optimisation presets as a Markdown table (in docs/config.md and the README, checked)."""
    out = ["| preset | source | settings that differ from the defaults |", "|---|---|---|"]
    defaults = AttackSettings()
    for name in PRESETS.names():
        p = PRESETS.get(name)
        diff = ", ".join(
            f"`{k}={v!r}`" for k, v in p.model_dump().items() if getattr(defaults, k) != v
        )
        out.append(f"| `{name}` | {PRESET_SOURCES[name]} | {diff} |")
    return "\n".join(out) + "\n"
