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


@hookspec
def register_commands(register: Any) -> None:
    """Register subcommands of the ``ckptio`` command line:
    ``register(name, add_arguments, run, help="", description=None)``.

    ``add_arguments(parser)`` adds the command's own arguments to its ``argparse`` subparser (the
    common ``--json``, ``-v``, ``--no-progress`` and storage options are already there);
    ``run(args, ctx)`` runs it and returns the exit status. ``ctx`` has ``json`` (bool),
    ``storage_options`` (dict, from ``-o``/``--storage-options``), ``emit(data, text)`` (print
    ``data`` as JSON with ``--json``, else ``text()``) and ``note(message)`` (stderr). A ckptio
    error raised by ``run`` becomes the documented exit status (1, or 3 for a missing plugin).

    Both callables may be dotted strings ``"package.module:function"``, imported only when the
    command runs, so ``ckptio --help`` and the other commands never import the plugin's CLI. A
    name the core uses itself (``ls``, ``cp``...) is never replaced.
    """


@hookspec
def register_integrations(register: Any) -> None:
    """Register integrations with training frameworks: ``register(name, target)``, where
    ``target`` is the entry object users install in their trainer (a Lightning ``CheckpointIO``,
    a ``transformers.Trainer`` subclass...) as a dotted string ``"package.module:Name"``.

    Integrations are not called by ckptio itself; registering them makes them discoverable
    (``ckptio plugins``, :func:`ckptio.list_plugins`), with an install hint when missing.
    """
