"""Model profiles: where a model comes from, its shape, its dominant layer and its tuning defaults."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ZoliteError


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: str                      # "package:<module>/<file>", "parts" (the [parts] table) or "hub:<org/name>"
    arch: str
    num_layers: int
    hf_id: str | None = None
    install_hint: str | None = None
    dominant_layer: int | None = None  # 0-based
    dominant_layer_source: str | None = None
    defaults: dict = field(default_factory=dict)
    # {"MODE/DTYPE": bytes per doubled token} of a ZO forward, measured by `zolite profile` on a GPU for this shape;
    # the planner uses them until the user's own `zolite profile` has measured the model
    activation_bytes_per_token: dict = field(default_factory=dict)
    activation_source: str | None = None
    parts: dict = field(default_factory=dict)   # source "parts": a file shipped as several packages (zolite.parts)
    # {task: {option: value}}: the options that scored best on that task, which `zolite tune --task TASK` starts from
    # (tune_setup.task_recipe; options given win, --no-recipe leaves them out)
    tasks: dict = field(default_factory=dict)


def profile_names() -> list[str]:
    files = resources.files("zolite.profiles").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def find_profile(name: str) -> Profile | None:
    """The profile called `name`, or None when there is none."""
    f = resources.files("zolite.profiles") / f"{name}.toml"
    if not f.is_file():
        return None
    return Profile(**tomllib.loads(f.read_text()))


def get_profile(name: str) -> Profile:
    profile = find_profile(name)
    if profile is None:
        raise ZoliteError(f"unknown model profile '{name}'; known profiles: {', '.join(profile_names())} "
                          "(or pass a local Hugging Face folder, a .gguf file or a hub id)")
    return profile
