"""A value that a component's constructor rejects, reported as one line naming the option.

jsonargparse instantiates the classes a config names; when one of their ``__init__`` methods
raises (``TokenMasking(rate=-0.1)``: "rate must lie in [0, 1]"), the user would see that error
wrapped in nested union-validation messages under a traceback. :func:`rejected_option` finds
the original error, the class whose ``__init__`` raised it, where the config names that class
(``data.masking``) and, when the message names one of its arguments, the option itself
(``data.masking.init_args.rate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fillmask.errors import FillmaskError


class OptionError(FillmaskError):
    """A config value a component's constructor rejected, with the option's full name."""


def rejected_option(error: BaseException, config: dict[str, Any]) -> OptionError | None:
    """The one-line error for ``error`` raised while instantiating ``config`` (the subcommand's
    config as nested dicts), or ``None`` when no class of the config raised it."""
    original = _innermost(error)
    raised_by = _raising_classes(original)
    text = str(original).strip()
    message = text.splitlines()[0] if text else type(original).__name__
    for path, spec in _class_specs(config):
        if not any(_names(cls, spec["class_path"]) for cls in raised_by):
            continue
        argument = _named_argument(message, spec.get("init_args") or {})
        option = f"{path}.init_args.{argument}" if argument else path
        return OptionError(f"{option}: {message}")
    return None


def _innermost(error: BaseException) -> BaseException:
    """The first exception of the chain (jsonargparse re-raises through union checks)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error


def _raising_classes(error: BaseException) -> list[type]:
    """Classes whose ``__init__`` is on the traceback of ``error``, innermost first."""
    classes: list[type] = []
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if owner is not None and type(owner) not in classes:
            classes.append(type(owner))
        tb = tb.tb_next
    return classes[::-1]


def _class_specs(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(option path, {"class_path", "init_args"})`` of every class the config names, the
    innermost first (a masking before the data module that holds it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "init_args":
                yield from _class_specs(value, f"{path}.{key}" if path else key)
        if "init_args" in node:
            yield from _class_specs(node["init_args"], f"{path}.init_args")
        if isinstance(node.get("class_path"), str):
            yield path, node
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _class_specs(value, f"{path}[{index}]")


def _names(cls: type, class_path: str) -> bool:
    return class_path in (f"{cls.__module__}.{cls.__qualname__}", cls.__name__) or \
        class_path.endswith(f".{cls.__name__}")


def _named_argument(message: str, init_args: dict[str, Any]) -> str | None:
    """The first argument of ``init_args`` that ``message`` names (``rate=-0.1``, ``rate``)."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message)
    return next((word for word in words if word in init_args), None)
