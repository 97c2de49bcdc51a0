"""LoRA adapters as data: the slot layout of a base export with LoRA slots, converted adapters, and the
slot buffers that hold the resident ones (numpy only; the engine binds the buffers by address).

A base export with LoRA slots (``loraship.export.lora_slots``) adds, for every projection that has a
slot (a *site*: ``layers.3.qkv_proj``, ``lm_head``), the term ``x · A_s · B_s`` of the slot ``s`` each row
selects to the projection's output. Its graph inputs:

- ``lora_ids`` ``[batch]`` int64: each row's slot, 1..S; 0 is the base (no adapter).
- ``lora_A.<site>`` and ``lora_B.<site>``, fixed shapes, in the activations' dtype (peft's scaling is
  folded into B):

  - design ``gather`` (per-row gather, quic/efficient-transformers): ``A [S+1, d_in, R]``,
    ``B [S+1, R, d_out]``; entry 0 is zeros. Each row gathers its own A and B.
  - design ``masked`` (masked concat, LoRAX): ``A [d_in, S·R]``, ``B [S·R, d_out]``; slot s holds
    columns (rows of B) ``(s-1)·R .. s·R``. ``H = x·A`` is masked by each row's one-hot slot, then ``H·B``.

``R`` is the site's slot rank: ``--max-lora-rank`` for each adapter module placed on it (the builder's
packed QKV MatMul takes q_proj, k_proj and v_proj of a Llama adapter side by side: ``A = [A_q|A_k|A_v]``,
``B`` block-diagonal). ``loraship.json`` of the export records the layout under ``lora_slots``.

A converted adapter (``loraship.export.lora_convert``) is a folder holding ``adapter_slots.safetensors``
(``<site>.A [d_in, R]`` and ``<site>.B [R, d_out]`` for each site it changes, rank zero-padded to R, the
scaling folded in; a site it does not change is absent, meaning zero) and ``loraship.json`` (kind
``lora_adapter``, the layout's fingerprint and every file's sha256). Any adapter converted for a layout
loads into any slot of every export with that layout, whichever design and slot count it has.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .integrity import IntegrityError, check_bytes, check_files
from .manifest import MANIFEST, Manifest

IDS_INPUT = "lora_ids"
DESIGNS = ("gather", "masked")
ADAPTER_KIND = "lora_adapter"
ADAPTER_FORMAT = 1
WEIGHTS_FILE = "adapter_slots.safetensors"

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class AdapterError(ValueError):
    """An adapter that cannot be served on this base; the message is one line naming why."""


class SlotsFull(RuntimeError):
    """Every slot holds an adapter that rows are using: the request waits for one to be released."""


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file (readable by the ``safetensors`` package and :func:`read_safetensors`)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        blob = array.tobytes()
        header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for blob in blobs:
            fh.write(blob)


def read_safetensors(path: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (the dtypes numpy has; bf16 is refused); ``data``: its bytes, read already."""
    data = Path(path).read_bytes() if data is None else data
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _ST_DTYPES:
                raise AdapterError(f"{path}: tensor {name} is {entry['dtype']}, which this reader does not take")
            begin, end = entry["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
            tensors[name] = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize, 8 + size + begin).reshape(entry["shape"])
        return tensors
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"{path} is not a readable safetensors file ({exc})") from None


@dataclass(frozen=True)
class Site:
    """One projection with a LoRA slot."""

    name: str  # "layers.3.qkv_proj", "lm_head"
    d_in: int
    d_out: int
    rank: int  # R: the slot's columns, --max-lora-rank per adapter module placed on this projection

    @property
    def a_input(self) -> str:
        return f"lora_A.{self.name}"

    @property
    def b_input(self) -> str:
        return f"lora_B.{self.name}"


@dataclass(frozen=True)
class SlotLayout:
    """The slots of a base export, as its ``loraship.json`` records them under ``lora_slots``."""

    design: str
    slots: int  # S: adapters resident at once
    max_rank: int
    dtype: str  # numpy name of the activations (float32, float16)
    sites: tuple[Site, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "SlotLayout":
        """The layout of an export's manifest; :class:`AdapterError` if it has no LoRA slots."""
        spec = manifest.lora_slots
        if not spec:
            raise AdapterError("this export has no LoRA slots; export the base with `export_base_with_slots`")
        sites = tuple(Site(name, *dims) for name, dims in spec["sites"].items())
        return cls(spec["design"], int(spec["max_adapters"]), int(spec["max_rank"]), spec["dtype"], sites)

    def a_shape(self, site: Site) -> tuple[int, ...]:
        if self.design == "gather":
            return (self.slots + 1, site.d_in, site.rank)
        return (site.d_in, self.slots * site.rank)

    def b_shape(self, site: Site) -> tuple[int, ...]:
        if self.design == "gather":
            return (self.slots + 1, site.rank, site.d_out)
        return (self.slots * site.rank, site.d_out)

    def inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every slot buffer input: name -> (shape, numpy dtype name)."""
        specs = {}
        for site in self.sites:
            specs[site.a_input] = (self.a_shape(site), self.dtype)
            specs[site.b_input] = (self.b_shape(site), self.dtype)
        return specs

    @property
    def slot_bytes(self) -> int:
        """Bytes of one adapter in its slot (every site, A and B)."""
        return sum(s.rank * (s.d_in + s.d_out) for s in self.sites) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of every slot buffer (the gather design's zero entry included)."""
        return sum(int(np.prod(shape)) for shape, _ in self.inputs().values()) * np.dtype(self.dtype).itemsize

    def fingerprint(self) -> str:
        """What a converted adapter must match: the sites' shapes, the slot rank and the dtype
        (not the design or the slot count, which only decide where a slot lives)."""
        key = {"dtype": self.dtype, "max_rank": self.max_rank, "sites": sorted([s.name, s.d_in, s.d_out, s.rank] for s in self.sites)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        return (f"LoRA slots: {self.slots} adapters x {len(self.sites)} projections, rank {self.max_rank} per module "
                f"({self.design}, {self.dtype}), {_mib(self.slot_bytes)} an adapter, {_mib(self.nbytes)} in all")


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


@dataclass(frozen=True)
class AdapterWeights:
    """A converted adapter read into host memory: ``site name -> (A [d_in, R], B [R, d_out])``."""

    name: str
    folder: Path
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    digest: str = ""  # adapter_digest of the files these weights were read from

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


def _adapter_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder} is not a converted adapter ({MANIFEST}: {exc})") from None
    if not isinstance(manifest, dict):
        raise AdapterError(f"{folder} is not a converted adapter ({MANIFEST} is not a JSON object)")
    return manifest


def _digest(folder: Path, manifest: dict) -> str:
    try:
        files = {k: v["sha256"] for k, v in sorted(manifest["files"].items())}
    except (KeyError, TypeError, AttributeError):
        raise AdapterError(f"{folder} records no checksums in its {MANIFEST}; convert the adapter again") from None
    return hashlib.sha256(json.dumps({"layout": manifest.get("layout"), "files": files}, sort_keys=True).encode()).hexdigest()


def adapter_digest(folder: Path) -> str:
    """What identifies a converted adapter: the sha256 of its layout and of the checksums its ``loraship.json``
    records (cheap: the weights are not read). Two folders with one digest hold the same adapter; a folder
    rewritten with other weights gets another. :class:`AdapterError` if it is no converted adapter."""
    return _digest(Path(folder), _adapter_manifest(Path(folder)))


def read_adapter(folder: Path, layout: SlotLayout, name: str | None = None, hashes: bool = True) -> AdapterWeights:
    """Read a converted adapter folder and check it against ``layout``; :class:`AdapterError` names why not.
    The weights file is read once, and those bytes are the ones checked and parsed."""
    folder = Path(folder)
    manifest = _adapter_manifest(folder)
    if manifest.get("kind") != ADAPTER_KIND or manifest.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{folder} is not a converted adapter (kind {manifest.get('kind')!r}, format "
                           f"{manifest.get('format')!r}); convert the peft adapter for this base first")
    if manifest.get("layout") != layout.fingerprint():
        raise AdapterError(f"adapter {folder} was converted for another base export (its slot layout differs: "
                           f"{manifest.get('base', '?')}); convert it again for this one")
    digest = _digest(folder, manifest)
    files = manifest["files"]
    if WEIGHTS_FILE not in files:
        raise AdapterError(f"{folder} records no checksum of {WEIGHTS_FILE}; convert the adapter again")
    try:
        check_files(folder, {k: v for k, v in files.items() if k != WEIGHTS_FILE}, hashes)
        data = (folder / WEIGHTS_FILE).read_bytes()
        check_bytes(folder / WEIGHTS_FILE, data, files[WEIGHTS_FILE], hashes)
    except IntegrityError as exc:
        raise AdapterError(str(exc)) from None
    except OSError as exc:
        raise AdapterError(f"{folder / WEIGHTS_FILE} is not readable ({exc})") from None
    raw = read_safetensors(folder / WEIGHTS_FILE, data)
    sites = {s.name: s for s in layout.sites}
    tensors = {}
    for key in raw:
        site_name, _, part = key.rpartition(".")
        site = sites.get(site_name)
        if site is None or part not in ("A", "B"):
            raise AdapterError(f"adapter {folder} holds {key}, which is no slot of this base")
    for site_name in sorted({k.rpartition(".")[0] for k in raw}):
        site = sites[site_name]
        a, b = raw.get(f"{site_name}.A"), raw.get(f"{site_name}.B")
        if a is None or b is None or a.shape != (site.d_in, site.rank) or b.shape != (site.rank, site.d_out) \
                or a.dtype != np.dtype(layout.dtype) or b.dtype != np.dtype(layout.dtype):
            raise AdapterError(f"adapter {folder}: {site_name} is not A [{site.d_in}, {site.rank}] and B "
                               f"[{site.rank}, {site.d_out}] of {layout.dtype}; convert it again")
        tensors[site_name] = (a, b)
    return AdapterWeights(name or folder.name, folder, tensors, digest)


class SlotTable:
    """``S`` resident adapters in fixed slot buffers, the graph inputs of a base export with LoRA slots.

    The buffers are allocated once; loading an adapter copies it into a slot's place and never
    reallocates, so their addresses (bound once, captured by CUDA graphs) stay valid. Slot ids are
    1..S; 0 is the base. An adapter is *in use* while rows hold it (:meth:`acquire`/:meth:`release`);
    a load that finds no free slot evicts the least recently used adapter that no row uses, and raises
    :class:`SlotsFull` when every slot is in use (the request then waits, first come first served).
    """

    def __init__(self, layout: SlotLayout) -> None:
        self.layout = layout
        self.buffers = {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.inputs().items()}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._users: dict[str, int] = {}
        self._free = list(range(layout.slots, 0, -1))  # popped lowest first
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []

    @property
    def slots(self) -> int:
        return self.layout.slots

    @property
    def resident(self) -> dict[str, int]:
        """Resident adapters and their slots, least recently used first."""
        with self._lock:
            return dict(self._resident)

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._resident.get(name)

    def users(self, name: str) -> int:
        with self._lock:
            return self._users.get(name, 0)

    def load(self, adapter: AdapterWeights | Path, name: str | None = None) -> int:
        """Make ``adapter`` resident (a folder is read and checked first); return its slot. A resident
        adapter of the same name keeps its slot and becomes the most recently used."""
        if not isinstance(adapter, AdapterWeights):
            adapter = read_adapter(Path(adapter), self.layout, name)
        name = name or adapter.name
        with self._lock:
            if name in self._resident:
                self._resident.move_to_end(name)
                return self._resident[name]
            slot = self._take_slot(name)
            self._write(slot, adapter)
            self._resident[name] = slot
        for listener in self._listeners:
            listener(slot)
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (no row may be using it)."""
        with self._lock:
            if self._users.get(name):
                raise RuntimeError(f"adapter {name!r} is in use by {self._users[name]} rows")
            slot = self._resident.pop(name, None)
            if slot is not None:
                self._free.append(slot)
                self._free.sort(reverse=True)

    def acquire(self, name: str) -> int:
        """One more row uses resident adapter ``name``; return its slot."""
        with self._lock:
            if name not in self._resident:
                raise KeyError(f"adapter {name!r} is not resident; load it first")
            self._users[name] = self._users.get(name, 0) + 1
            self._resident.move_to_end(name)
            return self._resident[name]

    def release(self, name: str) -> None:
        """A row that used ``name`` left."""
        with self._lock:
            left = self._users.get(name, 0) - 1
            if left < 0:
                raise RuntimeError(f"adapter {name!r} released more often than acquired")
            if left:
                self._users[name] = left
            else:
                self._users.pop(name, None)

    def ids(self, names: Sequence[str | None], out: np.ndarray | None = None) -> np.ndarray:
        """The ``lora_ids`` input of a batch: each row's slot (0 for None, the base), written into ``out`` if given."""
        with self._lock:
            missing = [n for n in names if n is not None and n not in self._resident]
            if missing:
                raise KeyError(f"adapter {missing[0]!r} is not resident; load it first")
            ids = [0 if n is None else self._resident[n] for n in names]
        if out is None:
            return np.asarray(ids, np.int64)
        out[: len(ids)] = ids
        return out

    def bind(self, binding, first: int = 0, count: int = 0, fresh: bool = False) -> None:
        """Bind every slot buffer (host memory) as an input of an ONNX Runtime IO binding, by address. The
        batch's rows (``first``, ``count``, ``fresh``: the ``Resident`` protocol of ``kv_rows``) do not
        matter: every row sees every slot and picks its own by ``lora_ids``."""
        for name, array in self.buffers.items():
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def on_write(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(slot)`` after every write into a slot (a device copy of the buffers follows it)."""
        self._listeners.append(listener)

    def _take_slot(self, name: str) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._resident:  # least recently used first
            if not self._users.get(victim):
                return self._resident.pop(victim)
        raise SlotsFull(f"all {self.slots} LoRA slots hold adapters in use; {name!r} waits for one")

    def _write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy ``adapter`` into ``slot`` in place; the sites it does not change become zero."""
        gather = self.layout.design == "gather"
        for site in self.layout.sites:
            a_buf, b_buf = self.buffers[site.a_input], self.buffers[site.b_input]
            if gather:
                a_dst, b_dst = a_buf[slot], b_buf[slot]
            else:
                cols = slice((slot - 1) * site.rank, slot * site.rank)
                a_dst, b_dst = a_buf[:, cols], b_buf[cols]
            pair = adapter.tensors.get(site.name)
            if pair is None:
                a_dst[...] = 0
                b_dst[...] = 0
            else:
                a_dst[...] = pair[0]
                b_dst[...] = pair[1]
