"""Plugin hooks: how a distribution tells ckptio what it provides.

Every hook has the shape ``register_<thing>(register)`` (as in simonw/llm): the plugin *calls*
``register`` once per thing, and ckptio handles ordering and collisions in one place. A plugin is
a module named by an entry point in the ``ckptio`` group::

    [project.entry-points.ckptio]
    mybackend = "my_package.plugin"

whose functions are decorated with :data:`hookimpl`.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("ckptio")
hookimpl = pluggy.HookimplMarker("ckptio")


@hookspec
def register_backends(register: Any) -> None:
    """Register storage backends: ``register(scheme, factory, priority=0)``.

    ``factory(url: ckptio.URL, **storage_options) -> ckptio.Backend`` may be a class, a callable or
    a lazy dotted string ``"package.module:Name"``. When two plugins serve a scheme the higher
    ``priority`` wins (catch-all backends such as fsspec use a negative one).
    """


@hookspec
def register_formats(register: Any) -> None:
    """Register checkpoint formats: ``register(name, format)`` where ``format`` is a
    :class:`ckptio.Format` instance, class or dotted string. Selected with ``name+scheme://``."""


@hookspec
def register_addons(register: Any) -> None:
    """Register addons: ``register(name, factory)``; ``factory(**options)`` returns an object
    whose methods implement the addon hooks in :mod:`ckptio.addons`. Installed addons stay inert
    until a manager or call activates them by name."""
