"""The adapters an engine serves, by name: registered as data (no restart), and the registry file
that keeps the set with the model repository.

An engine loaded from a base export with LoRA slots has one :class:`AdapterRegistry`. Registering an
adapter reads its converted folder (``loraship convert-adapter``) into host memory and checks it (layout
and every file's sha256) in the caller's thread, never on the decode loop; requests then name it, and the
scheduler's :class:`~.adapter_admission.SlotAdmission` copies it into a slot when a request needs it.
More adapters can be registered than there are slots: the slots hold the most recently used ones.

Each registration is one version of an adapter: its *key* is the name and the digest of its files
(:func:`~.adapters.adapter_digest`), so a name registered again with other weights is a new key, and the
requests already admitted finish on the weights they started with (nothing is ever served by a stale or a
mixed slot). Unregistering a name refuses new requests at once, in one line; requests already queued or
running keep their registration and finish.

The registry file (:data:`REGISTRY_FILE`, ``multi_lora.json``, as Triton's vLLM backend names it) is a
JSON object mapping each adapter name to its converted folder; relative paths are relative to the file's
folder, so a model repository on a share mounted anywhere (Azure Files on every replica) reads the same::

    {"sql": "adapters/sql", "roman": "adapters/roman"}

:meth:`AdapterRegistry.sync` reads it and applies the difference (new names registered, names gone
unregistered, a folder whose files changed registered again), so a replica that starts later, or one
told that the file changed, serves the same set. :func:`write_registry` writes it atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraship_contract import ADAPTER_NAME_PATTERN, REGISTRY_FILE  # noqa: F401 - REGISTRY_FILE: the engine's name for it too

from .adapters import AdapterError, AdapterWeights, SlotLayout, SlotTable, adapter_digest, read_adapter
from .errors import RequestError

NAME = re.compile(ADAPTER_NAME_PATTERN)


class UnknownAdapter(RequestError):
    """A request names an adapter that is not registered (the OpenAI frontend answers 404 ``model_not_found``)."""


class RegistryError(ValueError):
    """A registry file or an entry that cannot be used; the message is one line naming the file and why."""


def check_name(name: object) -> str:
    """``name`` if it can name an adapter; :class:`RegistryError` otherwise."""
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(f"adapter name {name!r} is not valid: use 1 to 128 letters, digits and . _ : @ / + -, "
                            "starting with a letter or digit")
    return name


@dataclass(frozen=True, eq=False)
class Registered:
    """One registration of an adapter: its name, folder, weights in host memory and the key of its slot."""

    name: str
    folder: Path
    digest: str
    weights: AdapterWeights = field(repr=False)

    @property
    def key(self) -> str:
        """The slot table's name for these weights: two registrations share a slot only if their files are equal."""
        return f"{self.name}@{self.digest[:16]}"


@dataclass
class SyncReport:
    """What :meth:`AdapterRegistry.sync` changed, and the entries it could not apply (name -> why)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.replaced)

    def describe(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("replaced", self.replaced)) if names]
        parts += [f"{name} not loaded: {why}" for name, why in self.failed.items()]
        return "; ".join(parts) or "no change"


def read_registry(path: str | Path) -> dict[str, Path]:
    """The registry file at ``path``: adapter name -> converted folder (relative paths resolved against the
    file's folder). :class:`RegistryError` names what is wrong in one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"adapter registry {path} not found; write {{}} there to serve no adapters") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"adapter registry {path} is not readable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"adapter registry {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"adapter registry {path} is not a JSON object of adapter name -> folder")
    entries = {}
    for name, folder in data.items():
        try:
            check_name(name)
        except RegistryError as exc:
            raise RegistryError(f"adapter registry {path}: {exc}") from None
        if not isinstance(folder, str) or not folder:
            raise RegistryError(f"adapter registry {path}: {name!r} maps to {folder!r}, not the path of a converted adapter")
        entries[name] = (path.parent / folder) if not os.path.isabs(folder) else Path(folder)
    return entries


def write_registry(path: str | Path, entries: dict[str, str | Path]) -> None:
    """Write the registry file atomically (a temporary file in its folder, then a rename): a replica reading
    it meanwhile sees the old set or the new one, never half of one. Paths are written as given."""
    path = Path(path)
    data = {check_name(name): str(folder) for name, folder in sorted(entries.items())}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AdapterRegistry:
    """The adapters one engine serves, by name (thread-safe: register and unregister from any thread)."""

    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self._adapters: dict[str, Registered] = {}
        self._lock = threading.Lock()

    @property
    def layout(self) -> SlotLayout:
        return self.table.layout

    def names(self) -> list[str]:
        """The names registered now, sorted (what ``/v1/models`` lists beside the base)."""
        with self._lock:
            return sorted(self._adapters)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters

    def get(self, name: str) -> Registered | None:
        with self._lock:
            return self._adapters.get(name)

    def current(self, key: str) -> bool:
        """Whether ``key`` is the registration of its name now (a slot of another key may be freed once unused)."""
        name = key.rpartition("@")[0]
        with self._lock:
            entry = self._adapters.get(name)
            return entry is not None and entry.key == key

    def resolve(self, name: str) -> Registered:
        """The registration a new request on ``name`` decodes with; :class:`UnknownAdapter` in one line if none."""
        with self._lock:
            entry = self._adapters.get(name)
            if entry is not None:
                return entry
            known = ", ".join(sorted(self._adapters)) or "none"
        raise UnknownAdapter(f"adapter {name!r} is not served by this model (adapters: {known}); "
                             "name a registered adapter, or none for the base model")

    def register(self, name: str, folder: str | Path, replace: bool = False) -> Registered:
        """Read and check the converted adapter in ``folder`` (this thread: every file's sha256, then its
        weights into host memory) and serve it as ``name``. A name already registered is refused unless
        ``replace`` (then new requests get the new weights; admitted ones finish on the old) or the folder
        holds the same files (nothing changes). :class:`RegistryError` or :class:`~.adapters.AdapterError`
        say why not in one line."""
        check_name(name)
        folder = Path(folder)
        digest = adapter_digest(folder)
        with self._lock:
            existing = self._adapters.get(name)
        if existing is not None and existing.digest == digest:
            return existing
        if existing is not None and not replace:
            raise RegistryError(f"adapter {name!r} is already registered (from {existing.folder}); unregister it first")
        weights = read_adapter(folder, self.layout, name)  # the digest of the files it checked and read
        entry = Registered(name, folder, weights.digest, weights)
        with self._lock:
            now = self._adapters.get(name)
            if now is not None and now is not existing and not replace:
                raise RegistryError(f"adapter {name!r} was registered meanwhile (from {now.folder})")
            self._adapters[name] = entry
        return entry

    def unregister(self, name: str) -> Registered:
        """Stop serving ``name``: new requests on it are refused from now on; requests already queued or
        running finish on it, and its slot is freed once they have. :class:`UnknownAdapter` if not registered."""
        with self._lock:
            entry = self._adapters.pop(name, None)
            known = ", ".join(sorted(self._adapters)) or "none"
        if entry is None:
            raise UnknownAdapter(f"adapter {name!r} is not registered (adapters: {known})")
        return entry

    def sync(self, path: str | Path) -> SyncReport:
        """Make the registered set the registry file's: register new names, unregister names the file no
        longer has, register again a name whose folder or files changed. Runs in the caller's thread (reads
        and checksums happen here, off the decode loop). An entry that cannot be loaded is reported in
        :attr:`SyncReport.failed` and the others still apply; a name that fails keeps its old registration.
        :class:`RegistryError` if the file itself is unusable (nothing changes then)."""
        wanted = read_registry(path)
        report = SyncReport()
        for name in self.names():
            if name not in wanted:
                self.unregister(name)
                report.removed.append(name)
        for name, folder in wanted.items():
            before = self.get(name)
            try:
                if before is not None and before.folder == folder and adapter_digest(folder) == before.digest:
                    continue
                after = self.register(name, folder, replace=True)
            except (AdapterError, RegistryError, OSError) as exc:
                report.failed[name] = str(exc)
                continue
            if before is None:
                report.added.append(name)
            elif after is not before:
                report.replaced.append(name)
        return report

    def describe(self) -> str:
        names = self.names()
        return f"{len(names)} adapters registered ({', '.join(names) or 'none'}); {self.layout.describe()}"


class RegistryWatcher:
    """Keeps a registry in step with its file: a daemon thread stats the file every ``interval`` seconds and
    runs :meth:`AdapterRegistry.sync` (reads and checksums included) on that thread when the file's inode,
    mtime or size changed, so the decode loop never waits on it. A file that is absent serves no adapters.
    ``log(line)`` gets one line per change, ``warn(line)`` (default: ``log``) one per entry that cannot be loaded; :attr:`failed` holds the
    entries the last sync could not load (name -> why) and :attr:`error` why the file itself is unusable."""

    def __init__(self, registry: AdapterRegistry, path: str | Path, interval: float = 0.25,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> None:
        self.registry, self.path, self.interval, self.log, self.warn = registry, Path(path), interval, log, warn or log
        self.failed: dict[str, str] = {}
        self.error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> SyncReport | None:
        """One poll: sync if the file changed since the last; what changed (None: the file did not)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:  # a share that is briefly unreachable: keep serving what is registered
            if self.error is None:
                self.warn(f"adapter registry {self.path} not readable ({exc}); serving the adapters loaded before")
            self.error = str(exc)
            return None
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        report = SyncReport()
        try:
            if stamp is None:
                for name in self.registry.names():
                    self.registry.unregister(name)
                    report.removed.append(name)
            else:
                report = self.registry.sync(self.path)
        except RegistryError as exc:
            self.error = str(exc)
            self.warn(f"{exc}; serving the adapters loaded before")
            return None
        self.error, self.failed = None, dict(report.failed)
        if report.changed:
            changes = SyncReport(report.added, report.removed, report.replaced).describe()
            self.log(f"adapters: {changes}; serving {', '.join(self.registry.names()) or 'none'}")
        for name, why in report.failed.items():
            self.warn(f"adapter {name} not loaded: {why}")
        return report

    def start(self) -> "RegistryWatcher":
        self.check()
        self._thread = threading.Thread(target=self._run, name="loraship-adapters", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - never end the watcher: log, and poll again
                self.warn(f"adapter registry {self.path}: sync failed ({type(exc).__name__}: {exc})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
