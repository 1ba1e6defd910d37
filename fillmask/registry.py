"""Plugins: the components installed packages register through entry points.

Three entry-point groups name what a package adds: ``fillmask.architectures`` (subclasses of
:class:`~fillmask.architectures.base.Encoder`), ``fillmask.objectives``
(:class:`~fillmask.objectives.base.EncoderObjective`) and ``fillmask.maskings``
(:class:`~fillmask.masking.base.Masking`). fillmask registers its own built-ins the same way.

Discovery imports every registered class before the CLI parser is built, so YAML can name a
class by its short name (``class_path: DebertaEncoder``); a full class path always works too.
The entry-point name is that short name, so it must equal the class's ``__name__``. A plugin
that fails to import, or registers something that is not a subclass of its group's base, is
skipped with a warning naming its distribution; two distributions claiming one name in one
group is an error naming both.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
import warnings
from dataclasses import dataclass, field

from fillmask.errors import FillmaskError

GROUPS: dict[str, str] = {
    "architectures": "fillmask.architectures.base.Encoder",
    "objectives": "fillmask.objectives.base.EncoderObjective",
    "maskings": "fillmask.masking.base.Masking",
}
"""Group (without the ``fillmask.`` prefix) -> the base class its components subclass."""


class PluginError(FillmaskError):
    """Installed plugins that contradict each other (two claim one name)."""


class PluginWarning(UserWarning):
    """A plugin that could not be loaded; the other components keep working."""


@dataclass(frozen=True)
class Component:
    """One registered class and where it comes from."""

    group: str
    name: str
    distribution: str
    version: str
    target: str  # the entry point's value, "package.module:Class"
    cls: type = field(compare=False, repr=False)

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@dataclass
class Registry:
    """What discovery found: components by group and name, and the plugins it skipped."""

    components: dict[str, dict[str, Component]]
    failures: list[str]

    def __iter__(self):
        for group in GROUPS:
            yield from self.components.get(group, {}).values()

    def group(self, name: str) -> dict[str, Component]:
        """The components of one group (``architectures``, ``objectives``, ``maskings``)."""
        return self.components.get(name, {})

    def provider(self, cls: type) -> Component | None:
        """The registered component that is ``cls``, if any."""
        return next((c for c in self if c.cls is cls), None)


def _base(group: str) -> type:
    module, _, name = GROUPS[group].rpartition(".")
    return getattr(importlib.import_module(module), name)


def _origin(entry: metadata.EntryPoint) -> tuple[str, str]:
    dist = entry.dist
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def _load(group: str, entry: metadata.EntryPoint) -> tuple[Component | None, str | None]:
    """Import one entry point: (component, None), or (None, why it was skipped)."""
    distribution, version = _origin(entry)
    where = f"{entry.name} = {entry.value} in fillmask.{group} of {distribution} {version}"
    try:
        cls = entry.load()
    except Exception as error:  # any import-time failure of third-party code
        return None, f"{where} failed to import: {type(error).__name__}: {error}"
    base = _base(group)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return None, f"{where} is not a subclass of {base.__qualname__}"
    if cls.__name__ != entry.name:
        return None, (f"{where}: the entry-point name must be the class name "
                      f"{cls.__name__!r} (YAML finds classes by that name)")
    return Component(group, entry.name, distribution, version, entry.value, cls), None


def discover(groups: tuple[str, ...] = tuple(GROUPS)) -> Registry:
    """Import every component of the installed distributions (of ``groups``), sorted by group,
    name and distribution; warn about (and skip) broken ones; refuse duplicate names."""
    components: dict[str, dict[str, Component]] = {}
    failures: list[str] = []
    for group in groups:
        entries = metadata.entry_points(group=f"fillmask.{group}")
        found: dict[str, Component] = {}
        for entry in sorted(entries, key=lambda e: (e.name, _origin(e)[0], e.value)):
            component, problem = _load(group, entry)
            if problem is not None:
                failures.append(problem)
                warnings.warn(f"fillmask: skipping plugin {problem}; the other components "
                              "keep working", PluginWarning, stacklevel=2)
                continue
            assert component is not None
            if component.name in found:
                other = found[component.name]
                raise PluginError(
                    f"two installed distributions register {component.name!r} in "
                    f"fillmask.{group}: {other.distribution} {other.version} ({other.target}) "
                    f"and {component.distribution} {component.version} ({component.target}); "
                    "uninstall one of them")
            found[component.name] = component
        components[group] = found
    return Registry(components, failures)


@functools.cache
def registry() -> Registry:
    """The installed components, discovered once per process."""
    return discover()


def architectures() -> dict[str, Component]:
    """The registered architectures by name, discovered without importing the objectives
    (LightningModules): loading a model to fill masks or score needs torch alone."""
    if registry.cache_info().currsize:  # everything is discovered already
        return registry().group("architectures")
    return _architectures()


@functools.cache
def _architectures() -> dict[str, Component]:
    return discover(("architectures",)).group("architectures")


def load_plugins() -> Registry:
    """Discover (once) and import every registered component: afterwards YAML resolves their
    short names. Called before the CLI parser is built."""
    return registry()


def provenance(cls: type) -> dict[str, str]:
    """``{"distribution", "version"}`` of the installed package that provides ``cls``
    (registered or not), for checkpoint metadata; empty when unknown."""
    component = registry().provider(cls)
    if component is not None:
        return {"distribution": component.distribution, "version": component.version}
    top = cls.__module__.split(".")[0]
    names = metadata.packages_distributions().get(top, [])
    if not names:
        return {}
    return {"distribution": names[0], "version": metadata.version(names[0])}
