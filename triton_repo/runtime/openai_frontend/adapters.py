"""Adapters by OpenAI model name (issue 19): which served name is a base model and which an adapter of one,
as the models themselves say (:class:`Adapters`), and vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` through the model repository.

The truth is each model's: a request with the parameter ``loraship_adapters`` (``ADAPTERS_QUERY``) is
answered by the model at once, off its decode loop, with the adapters it serves and those it refused.
The names are cached for ``ADAPTERS_TTL`` seconds; a name not in the cache reads them again (at most
every ``MISS_REFRESH_S``) before it is a 404, so an adapter loaded a moment ago is found at once.

Loading installs the converted folder into ``<repository>/<model>/adapters/`` and names it in
``multi_lora.json`` (``adapter_store``, the one writer loraship uses too); every instance of the model
polls that file and loads it, and the load answers once the model serves it (or refuses it: the entry is
then taken back and the model's reason is the 400). Unloading removes the entry; requests running on
it finish, new ones are 404.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship_contract import ADAPTERS_QUERY

from ..adapter_store import StoreError, check_name, check_source, install, read_entries, uninstall
from .errors import ApiError
from .triton import Triton, model_path

ADAPTERS_TTL = 1.0  # seconds the served adapters are trusted before they are asked for again
MISS_REFRESH_S = 0.2  # a name not known reads them again at most this often
LOAD_TIMEOUT_S = 60.0  # the most a load (or unload) waits for the model to serve (or drop) the adapter
LOAD_POLL_S = 0.02  # seconds between asking the model during a load


@dataclass(frozen=True)
class Served:
    """What one model says it serves: its LoRA slots (0: none), its adapters, the entries it refused."""

    model: str
    slots: int = 0
    adapters: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where a request for an OpenAI model name goes: the Triton model, and the adapter (None: the base)."""

    model: str
    adapter: str | None = None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Adapters:
    """The served names (base models and their adapters), cached briefly, and hot-load through ``repository``."""

    def __init__(self, triton: Triton, repository: str | None = None, api_key: str | None = None, host: str = "127.0.0.1") -> None:
        self.triton, self.repository = triton, Path(repository) if repository else None
        self.guarded = api_key is None and not is_loopback(host)  # no key on a public address: loading is refused
        self.served: dict[str, Served] = {}
        self.fetched = -float("inf")
        self.lock = asyncio.Lock()
        self.changes = asyncio.Lock()  # one load or unload at a time

    # -- what is served ----------------------------------------------------------------------------
    async def ask(self, model: str) -> Served:
        """What ``model`` serves, asked now; a model that does not answer the query serves no adapters."""
        status, events = await self.triton.once(f"{model_path(model)}/generate_stream", json_body={ADAPTERS_QUERY: True}, timeout=10)
        if status != 200 or isinstance(events, str) or not events or "text_output" not in events[0]:
            return Served(model)
        try:
            data = json.loads(events[0]["text_output"])
            return Served(model, int(data.get("slots") or 0), tuple(data.get("adapters") or ()), dict(data.get("failed") or {}))
        except (ValueError, TypeError, AttributeError):
            return Served(model)

    async def refresh(self, max_age: float = ADAPTERS_TTL) -> dict[str, Served]:
        """Every ready model and what it serves, read again if older than ``max_age`` seconds."""
        if time.monotonic() - self.fetched < max_age:
            return self.served
        async with self.lock:
            if time.monotonic() - self.fetched >= max_age:
                models = await self.triton.models()
                answers = await asyncio.gather(*(self.ask(m) for m in models))
                self.served, self.fetched = {s.model: s for s in answers}, time.monotonic()
        return self.served

    async def names(self) -> list[Route]:
        """Every served name: each base model, then its adapters (a name that is also a model is the model)."""
        served = await self.refresh()
        routes = [Route(m) for m in sorted(served)]
        routes += [Route(m, a) for m in sorted(served) for a in served[m].adapters if a not in served]
        return routes

    async def route(self, name: str) -> Route:
        """Where a request for ``name`` goes; 404 ``model_not_found`` for a name nothing serves."""
        for max_age in (ADAPTERS_TTL, MISS_REFRESH_S):
            found = self._find(name, await self.refresh(max_age))
            if found is not None:
                return found
        raise not_found(name)

    @staticmethod
    def _find(name: str, served: dict[str, Served]) -> Route | None:
        if name in served:
            return Route(name)
        return next((Route(m, name) for m, s in sorted(served.items()) if name in s.adapters), None)

    # -- hot-load ----------------------------------------------------------------------------------
    async def load(self, name: str, path: str, base: str | None = None) -> str:
        """Install the converted adapter at ``path`` as ``name`` and wait until the model serves it."""
        self._check_allowed()
        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        try:
            check_name(name)
        except StoreError as exc:
            raise ApiError(400, str(exc), param="lora_name") from None
        async with self.changes:
            served = await self.refresh(0)
            if self._find(name, served) is not None:
                raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            model = self._base(served, base)
            try:
                check_source(Path(path))
            except StoreError as exc:
                status = 404 if "is not a folder" in exc.message else 400
                raise ApiError(status, str(exc), param="lora_path", code="adapter_not_found" if status == 404 else None) from None
            model_dir = self.repository / model
            try:
                await asyncio.to_thread(install, model_dir, name, Path(path))
            except (StoreError, OSError) as exc:
                raise ApiError(400, f"adapter '{name}' could not be installed: {exc}", param="lora_path") from None
            try:
                now = await self._until(model, lambda s: name in s.adapters or name in s.failed)
            except ApiError:
                await asyncio.to_thread(_take_back, model_dir, name)
                raise
            if name not in now.adapters:  # the model refused it (layout, checksums): take the entry back
                await asyncio.to_thread(_take_back, model_dir, name)
                raise ApiError(400, f"Loading lora {name} failed: {now.failed[name]}", param="lora_path")
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str) -> str:
        """Remove adapter ``name`` from the repository and wait until the model no longer serves it."""
        self._check_allowed()
        if not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        async with self.changes:
            served = await self.refresh(0)
            model = next((m for m in sorted(served) if name in self._entries(m)), None)
            if model is None:
                raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found")
            try:
                await asyncio.to_thread(uninstall, self.repository / model, name)
            except (StoreError, OSError) as exc:
                raise ApiError(400, f"adapter '{name}' could not be removed: {exc}", param="lora_name") from None
            await self._until(model, lambda s: name not in s.adapters)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _check_allowed(self) -> None:
        if self.repository is None:
            raise ApiError(501, "loading adapters needs the model repository: start the frontend with --model-repository "
                                "(`loraship serve` and the container's start.sh pass it)", code="not_implemented")
        if self.guarded:
            raise ApiError(403, "loading and unloading adapters needs an API key on a public address: set LORASHIP_API_KEY "
                                "(or serve on 127.0.0.1 only)", code="forbidden")

    def _entries(self, model: str) -> dict[str, str]:
        try:
            return read_entries(self.repository / model)
        except StoreError:
            return {}

    def _base(self, served: dict[str, Served], base: str | None) -> str:
        """The model an adapter is loaded into: ``base`` when given, else the one model with LoRA slots."""
        if base is not None:
            if base not in served:
                raise not_found(base)
            if not served[base].slots:
                raise ApiError(400, f"model `{base}` has no LoRA slots, so it serves no adapters: export its base with "
                                    "`loraship export --max-adapters N`", param="model")
            return base
        slotted = sorted(m for m, s in served.items() if s.slots)
        if len(slotted) != 1:
            raise ApiError(400, "no served model has LoRA slots (export the base with `loraship export --max-adapters N`)"
                           if not slotted else f"several models take adapters ({', '.join(slotted)}): name one as \"model\"",
                           param="model")
        return slotted[0]

    async def _until(self, model: str, done: Any) -> Served:
        """Ask ``model`` until ``done(served)``, and return what it serves then; 504 after ``LOAD_TIMEOUT_S``."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            served = await self.ask(model)
            if done(served):
                self.served = {**self.served, model: served}
                self.fetched = -float("inf")  # the other models are read again on the next request
                return served
            if time.monotonic() > deadline:
                raise ApiError(504, f"model `{model}` did not pick up the change in {LOAD_TIMEOUT_S:.0f} s; is it polling "
                                    "its multi_lora.json?", "server_error")
            await asyncio.sleep(LOAD_POLL_S)


def _take_back(model_dir: Path, name: str) -> None:
    try:
        uninstall(model_dir, name)
    except StoreError:
        pass


def not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist (GET /v1/models lists the served models and adapters)",
                    param="model", code="model_not_found")
