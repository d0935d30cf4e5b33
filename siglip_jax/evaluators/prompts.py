"""Class names and prompt templates: packaged assets by name, and the prompts built from them.

Assets (see evaluators/assets/README.md): class names "imagenet" (1000 ImageNet-1k names, CLIP
cleaned list) and templates "clip80" (the 80 CLIP ImageNet templates) and "clip7" (the CLIP
notebook's 7-template subset). Config values for class names / templates may be an asset name
or a list of strings; templates may also be one string containing "{}".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

CLASS_NAME_ASSETS = {"imagenet": "imagenet.txt"}
TEMPLATE_ASSETS = {"clip80": "clip80.txt", "clip7": "clip7.txt"}
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


class PromptError(ValueError):
    """Unknown asset name or unusable class names / templates."""


@functools.cache
def _read_asset(filename: str) -> tuple[str, ...]:
    with open(os.path.join(ASSET_DIR, filename), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def class_names(value: str | Sequence[str]) -> list[str]:
    """An asset name ("imagenet") or a list of class names → the list of names."""
    if isinstance(value, str):
        if value not in CLASS_NAME_ASSETS:
            raise PromptError(f"class names {value!r}: not a packaged asset; expected one of "
                              f"{sorted(CLASS_NAME_ASSETS)} or a list of names")
        return list(_read_asset(CLASS_NAME_ASSETS[value]))
    names = [str(name) for name in value]
    if not names:
        raise PromptError("class names: the list is empty")
    return names


def templates(value: str | Sequence[str]) -> list[str]:
    """An asset name ("clip80", "clip7"), one template with "{}", or a list of templates."""
    if isinstance(value, str):
        if value in TEMPLATE_ASSETS:
            return list(_read_asset(TEMPLATE_ASSETS[value]))
        if "{}" not in value:
            raise PromptError(f"templates {value!r}: not a packaged asset "
                              f"{sorted(TEMPLATE_ASSETS)} and has no '{{}}' for the class name")
        value = [value]
    result = [str(t) for t in value]
    if not result:
        raise PromptError("templates: the list is empty")
    for template in result:
        if "{}" not in template:
            raise PromptError(f"prompt template {template!r} has no '{{}}' for the class name")
    return result


def prompts(names: Sequence[str], templates_: Sequence[str]) -> list[str]:
    """All class × template prompts, class-major: prompts[c * T + t]."""
    for template in templates_:
        if "{}" not in template:
            raise PromptError(f"prompt template {template!r} has no '{{}}' for the class name")
    return [template.replace("{}", name) for name in names for template in templates_]
