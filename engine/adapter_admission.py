"""Which waiting requests join the batch when they need LoRA slots: the scheduler's admission for an
engine that serves adapters (a base export with LoRA slots).

A request on the base (no adapter) or on an adapter that is resident needs only a free KV row. One whose
adapter is not resident also needs a slot: a free one, or one whose adapter no running request uses
(the least recently used goes, and the adapter is copied into it in place: between decode steps, on the
scheduler's thread, from the host memory the registry read it into). Slots are never allocated, so a
request never fails for want of memory: when every slot holds an adapter that running requests use, it
waits.

**The admission rule.** Requests are taken in order of arrival while there are free rows. A request
that waits for a slot blocks only the requests behind it that need a slot too, plus those on the one
adapter it is waiting to replace (the *draining* slot); requests on the base and on the other resident
adapters go on joining. So:

- the base and the other adapters are never starved by a request that waits for a slot (strict first
  come first served would leave free rows idle behind it: measured in ``benchmarks/multi_lora_engine.py``);
- the waiting request is not starved either: the draining slot's requests all finish within their
  ``max_tokens``, no new one joins it meanwhile, and then the slot is the waiting request's; requests
  needing slots are admitted in their order of arrival.

The draining slot is the one whose running requests end soonest (the fewest tokens left at most), the
least recently used on a tie; it is kept until the waiting request joins. ``strict=True`` admits in
strict arrival order instead (a request that waits blocks everything behind it).
"""

from __future__ import annotations

from .adapter_registry import AdapterRegistry
from .adapters import SlotsFull
from .request import Request


class SlotAdmission:
    """Admission of requests to a batch over LoRA slots (the scheduler's ``admission``; scheduler thread only,
    but for :meth:`take`/:meth:`give` around a request run outside any scheduler)."""

    def __init__(self, registry: AdapterRegistry, strict: bool = False) -> None:
        self.registry = registry
        self.table = registry.table
        self.strict = strict
        self._holding: dict[Request, str] = {}  # admitted requests on an adapter -> the key of their slot
        self._draining: str | None = None  # the slot kept free of new requests for the first one waiting
        self.loads = 0  # adapters copied into a slot
        self.waits = 0  # turns in which a request waited for a slot

    def select(self, waiting: list[Request], room: int) -> tuple[list[Request], list[Request]]:
        """Split ``waiting`` (in order of arrival) into the requests that join now (each with its slot, at
        most ``room``) and those that go on waiting, by the rule above. A request whose adapter cannot be
        copied into a slot (a device fault) fails alone and is in neither list."""
        joining: list[Request] = []
        left: list[Request] = []
        blocked = False  # a request earlier in the queue waits for a slot
        for request in waiting:
            entry = request.lora
            if len(joining) >= room or (blocked and self.strict):
                left.append(request)
            elif entry is None:
                joining.append(request)
            elif blocked and (entry.key == self._draining or self.table.slot_of(entry.key) is None):
                left.append(request)
            else:
                try:
                    taken = self.take(request)
                except Exception as exc:  # noqa: BLE001 - copying its adapter failed: this request alone fails
                    request.fail(exc)
                    continue
                if taken:
                    joining.append(request)
                else:
                    blocked = True
                    self.waits += 1
                    self._drain()
                    left.append(request)
        if not blocked:
            self._draining = None
        return joining, left

    def take(self, request: Request) -> bool:
        """Give ``request`` the slot of its adapter, copying the adapter in if it is not resident; False
        if every slot is in use. Sets ``request.slot``."""
        key = request.lora.key
        if self.table.slot_of(key) is None:
            try:
                self.table.load(request.lora.weights, name=key)
            except SlotsFull:
                return False
            except BaseException:
                if not self.table.users(key):  # a slot half copied serves no one
                    self.table.unload(key)
                raise
            self.loads += 1
        request.slot = self.table.acquire(key)
        self._holding[request] = key
        return True

    def give(self, request: Request) -> None:
        """``request`` is done with its slot."""
        key = self._holding.pop(request, None)
        if key is not None:
            self.table.release(key)
            if not self.registry.current(key) and not self.table.users(key):  # unregistered or replaced
                self.table.unload(key)

    def settle(self) -> None:
        """After a step: the slots of requests that finished are released."""
        for request in [r for r in self._holding if r.completion is not None]:
            self.give(request)

    def _drain(self) -> None:
        """Choose the slot to keep free of new requests for the first request waiting for one."""
        resident = self.table.resident  # least recently used first
        if self._draining in resident:
            return
        left: dict[str, int] = {}
        for request, key in self._holding.items():
            left[key] = max(left.get(key, 0), request.params.max_tokens - len(request.generated))
        order = list(resident)
        self._draining = min(order, key=lambda key: (left.get(key, 0), order.index(key)), default=None)
