"""Write docs/config.md from the pydantic models, so the reference cannot drift from the code.

    python docs/gen_config.py > docs/config.md
"""

from __future__ import annotations

from pydantic import BaseModel

from strfx.config import StrfxConfig


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    found = [(prefix, model)]
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            found += _sections(sub, f"{prefix}.{name}" if prefix else name)
    return found


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "A YAML file passed with `--config`. Every section is optional; unknown keys are errors that name",
        "the field. Generated from `strfx/config.py` by `python docs/gen_config.py > docs/config.md`.",
        "",
    ]
    for title, model in _sections(StrfxConfig, ""):
        if not title:
            continue
        lines += [f"## `{title}`", "", (model.__doc__ or "").strip(), "", "| field | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                default = f"see `{title}.{name}`"
            else:
                default = f"`{field.default_factory() if field.default_factory else field.default}`"
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
