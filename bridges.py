"""The catalogue of bridges: which modules give each bridge its routes, job handlers and
periodic tasks. webhook_server and poller read it; nothing else does.

Owns: `BRIDGES` and the functions that collect their parts.
Must not: contain bridge logic.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BridgeModules:
    """Names of the modules of one bridge. The routes module exposes `blueprint`, and optionally
    `PLAIN_ROUTES` (see `webhook_server.PlainRoutes`); the jobs
    module exposes `HANDLERS`, and optionally `ON_DEAD`, `SCHEDULES`
    (a list of `(interval_seconds_from_settings, task(ctx))`) and `PRUNE` (a list of
    `prune(conn, older_than)` that delete the bridge's rows past retention, in their own
    transactions: `db_manager.delete_in_batches`)."""

    name: str
    routes: str
    jobs: str


BRIDGES: tuple[BridgeModules, ...] = (
    BridgeModules("whatsapp", routes="kommo_routes", jobs="whatsapp_jobs"),
    BridgeModules("mercadolivre", routes="meli_routes", jobs="meli_jobs"),
)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:  # bridge not built yet in this checkout
            return None
        raise


def _enabled_modules(settings, part: str):
    """The `part` ("routes" or "jobs") modules of the enabled bridges built in this checkout."""
    for bridge in BRIDGES:
        if settings.bridge_enabled(bridge.name):
            module = _module(getattr(bridge, part))
            if module is not None:
                yield module


def blueprints(settings) -> list:
    """Flask blueprints of the enabled bridges."""
    return [module.blueprint for module in _enabled_modules(settings, "routes")]


def plain_routes(settings) -> list[tuple]:
    """(path pattern, WSGI handler) pairs of the enabled bridges, served before Flask."""
    return [route for module in _enabled_modules(settings, "routes")
            for route in getattr(module, "PLAIN_ROUTES", [])]


def handlers() -> tuple[dict, dict]:
    """(HANDLERS, ON_DEAD) of every bridge: jobs already queued must run even if their bridge's
    schedules are off."""
    all_handlers, all_on_dead = {}, {}
    for bridge in BRIDGES:
        module = _module(bridge.jobs)
        if module is None:
            continue
        all_handlers.update(module.HANDLERS)
        all_on_dead.update(getattr(module, "ON_DEAD", {}))
    return all_handlers, all_on_dead


def pruners() -> list:
    """`prune(conn, older_than)` functions of every bridge: data past retention goes even if
    its bridge is off now."""
    return [prune for bridge in BRIDGES if (module := _module(bridge.jobs)) is not None
            for prune in getattr(module, "PRUNE", [])]


def schedules(settings) -> list[tuple]:
    """(interval_seconds, task) pairs of the enabled bridges."""
    return [(interval(settings) if callable(interval) else interval, task)
            for module in _enabled_modules(settings, "jobs")
            for interval, task in getattr(module, "SCHEDULES", [])]
