"""``loraship.json``, the export manifest: what ``loraship export`` wrote beside the model, typed.

The file name is written here once (:data:`MANIFEST`). ``loraship export`` builds a :class:`Manifest`
(``loraship.export.manifest``), ``loraship.engine.integrity`` records every other file's size and
sha256 in it, ``verify`` adds its report, and the engine, ``loraship repo``, ``azure upload`` and the
Triton model read it back. Keys this version does not know are kept as they are, and keys absent from
a manifest stay absent when it is written again (older exports and hand-made folders lack some), so
a read and a write change nothing else; :meth:`Manifest.read` checks only the format, and each reader
checks what it needs (``Engine.load``: ``max_context``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

MANIFEST = "loraship.json"  # the one place the name is written
FORMAT = 1


class FileEntry(TypedDict):
    """One file of an export, as recorded in ``files``."""

    size: int
    sha256: str


class ManifestError(ValueError):
    """A missing, unreadable or foreign manifest; the message is one line naming the file."""


_INTS = ("max_context", "pad_token_id", "num_layers", "kv_heads", "head_dim")


@dataclass(frozen=True)
class Manifest:
    """An export's manifest; ``None`` is a key the file does not have."""

    format: int = FORMAT
    engine: str | None = None  # the exporter: genai (onnxruntime-genai's builder) or optimum
    kv_cache: str | None = None  # shared (GroupQueryAttention: KV rows updated in place) or grown; absent before it was recorded
    kv_dtype: str | None = None  # the KV cache's numpy dtype name
    model_file: str | None = None  # the ONNX file (model.onnx where absent)
    dtype: str | None = None  # fp32 | fp16 | int4
    architecture: str | None = None  # the config's model_type
    max_context: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    files: dict[str, FileEntry] | None = None  # every other file of the export: size and sha256 (loraship.engine.integrity)
    verify: dict[str, Any] | None = None  # the report of `loraship verify`
    lora_slots: dict[str, Any] | None = None  # a base export with LoRA slots: their layout (engine.adapters.SlotLayout)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def shares_kv(self) -> bool:
        """Whether the decoder appends to a max-length KV buffer in place (``kv_cache: shared``; exports made
        before the manifest said so: the genai builder's)."""
        return (self.kv_cache or ("shared" if self.engine == "genai" else "grown")) == "shared"

    @property
    def model_name(self) -> str:
        """The ONNX file's name in the export folder."""
        return self.model_file or "model.onnx"

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(self.eos_token_ids or ())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in _INTS:
            if known.get(key) is not None:
                known[key] = int(known[key])
        if known.get("eos_token_ids") is not None:
            known["eos_token_ids"] = tuple(int(i) for i in known["eos_token_ids"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys that are set, then the unknown ones."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if v is not None}
        return {**data, **self.extra}

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """``folder``'s manifest; :class:`ManifestError` if it is missing, not a JSON object or of another format."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"export manifest not found: {folder} has no {MANIFEST}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"export manifest {path} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"export manifest {path} is not a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path} has format {data.get('format')!r}, expected {FORMAT}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"export manifest {path} holds a value of the wrong type ({exc})") from None

    def write(self, folder: str | Path) -> None:
        """Write ``folder``'s manifest atomically (a temporary file, then a rename)."""
        path = Path(folder) / MANIFEST
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=folder)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
