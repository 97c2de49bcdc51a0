"""The serving side of LoRA slots (numpy only): converted adapter folders read and checked, and the
SlotTable's residency (fixed buffers written in place, least-recently-used eviction of adapters no row
uses, SlotsFull when every slot is in use, per-row ids). Synthetic layouts and adapters: no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraship.engine.adapters import (
    ADAPTER_FORMAT,
    ADAPTER_KIND,
    WEIGHTS_FILE,
    AdapterError,
    Site,
    SlotLayout,
    SlotsFull,
    SlotTable,
    read_adapter,
    read_safetensors,
    write_safetensors,
)
from loraship.engine.integrity import checksums
from loraship.engine.manifest import MANIFEST

SITES = (Site("layers.0.qkv_proj", 8, 16, 4), Site("layers.0.o_proj", 8, 8, 2))


def layout(design: str = "gather", slots: int = 2) -> SlotLayout:
    return SlotLayout(design, slots, 2, "float32", SITES)


def make_adapter(folder, lay: SlotLayout, seed: int, sites=None) -> dict:
    """A converted adapter folder with random weights on ``sites`` (default all); return its tensors."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for site in lay.sites:
        if sites is None or site.name in sites:
            tensors[f"{site.name}.A"] = rng.standard_normal((site.d_in, site.rank)).astype(np.float32)
            tensors[f"{site.name}.B"] = rng.standard_normal((site.rank, site.d_out)).astype(np.float32)
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    manifest = {"format": ADAPTER_FORMAT, "kind": ADAPTER_KIND, "layout": lay.fingerprint()}
    (folder / MANIFEST).write_text(json.dumps({**manifest, "files": checksums(folder)}))
    return tensors


def slot_weights(table: SlotTable, slot: int, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """What slot ``slot`` holds for ``site``, as A [d_in, R] and B [R, d_out]."""
    a, b = table.buffers[site.a_input], table.buffers[site.b_input]
    if table.layout.design == "gather":
        return a[slot], b[slot]
    cols = slice((slot - 1) * site.rank, slot * site.rank)
    return a[:, cols], b[cols]


def test_safetensors_round_trip_is_readable_by_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    tensors = {"a.A": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((3,), np.float16)}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "np"})
    for loaded in (read_safetensors(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))):
        assert set(loaded) == set(tensors)
        for name, value in tensors.items():
            assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)


def test_layout_shapes_of_both_designs():
    gather, masked = layout("gather", 3), layout("masked", 3)
    assert gather.inputs()["lora_A.layers.0.qkv_proj"] == ((4, 8, 4), "float32")
    assert gather.inputs()["lora_B.layers.0.qkv_proj"] == ((4, 4, 16), "float32")
    assert masked.inputs()["lora_A.layers.0.qkv_proj"] == ((8, 12), "float32")
    assert masked.inputs()["lora_B.layers.0.o_proj"] == ((6, 8), "float32")
    assert gather.fingerprint() == masked.fingerprint()  # an adapter converted once fits both designs
    assert gather.slot_bytes == (4 * (8 + 16) + 2 * (8 + 8)) * 4


@pytest.mark.parametrize("design", ["gather", "masked"])
def test_load_writes_in_place_and_evicts_least_recently_used(tmp_path, design):
    lay = layout(design, slots=2)
    table = SlotTable(lay)
    addresses = {name: buf.ctypes.data for name, buf in table.buffers.items()}
    weights = {n: make_adapter(tmp_path / n, lay, seed=i) for i, n in enumerate(["a", "b", "c"])}
    assert table.load(tmp_path / "a") == 1
    assert table.load(tmp_path / "b") == 2
    assert table.load(tmp_path / "a") == 1  # resident: same slot, now the most recently used
    assert table.resident == {"b": 2, "a": 1}
    assert table.load(tmp_path / "c") == 2  # b was least recently used
    assert table.resident == {"a": 1, "c": 2}
    for slot, name in ((1, "a"), (2, "c")):
        for site in lay.sites:
            a, b = slot_weights(table, slot, site)
            assert np.array_equal(a, weights[name][f"{site.name}.A"]) and np.array_equal(b, weights[name][f"{site.name}.B"])
    if design == "gather":
        assert not table.buffers["lora_A.layers.0.qkv_proj"][0].any()  # entry 0 stays the base
    assert {name: buf.ctypes.data for name, buf in table.buffers.items()} == addresses  # never reallocated


def test_adapters_in_use_are_not_evicted_and_a_full_table_says_so(tmp_path):
    lay = layout(slots=2)
    table = SlotTable(lay)
    for i, name in enumerate(["a", "b", "c"]):
        make_adapter(tmp_path / name, lay, seed=i)
    table.load(tmp_path / "a")
    table.load(tmp_path / "b")
    assert table.acquire("a") == 1 and table.acquire("b") == 2 and table.acquire("b") == 2
    with pytest.raises(SlotsFull, match="all 2 LoRA slots hold adapters in use; 'c' waits"):
        table.load(tmp_path / "c")
    table.release("b")
    with pytest.raises(SlotsFull):
        table.load(tmp_path / "c")  # b still has a row
    table.release("b")
    assert table.users("b") == 0
    assert table.load(tmp_path / "c") == 2  # a is older but in use: b goes
    assert table.resident == {"a": 1, "c": 2}
    with pytest.raises(RuntimeError, match="in use by 1 rows"):
        table.unload("a")
    table.release("a")
    table.unload("a")
    assert table.load(tmp_path / "b") == 1
    with pytest.raises(RuntimeError, match="released more often"):
        table.release("a")


def test_a_reused_slot_holds_only_the_new_adapter(tmp_path):
    """An adapter on one site, loaded where one on every site was, leaves the other site zero."""
    lay = layout(slots=1)
    table = SlotTable(lay)
    make_adapter(tmp_path / "full", lay, seed=0)
    partial = make_adapter(tmp_path / "partial", lay, seed=1, sites={"layers.0.o_proj"})
    table.load(tmp_path / "full")
    assert table.load(tmp_path / "partial") == 1
    a, b = slot_weights(table, 1, SITES[0])
    assert not a.any() and not b.any()
    assert np.array_equal(slot_weights(table, 1, SITES[1])[1], partial["layers.0.o_proj.B"])


def test_ids_of_a_batch(tmp_path):
    lay = layout(slots=2)
    table = SlotTable(lay)
    for i, name in enumerate(["a", "b"]):
        make_adapter(tmp_path / name, lay, seed=i)
        table.load(tmp_path / name)
    assert table.ids(["b", None, "a", "b"]).tolist() == [2, 0, 1, 2]
    out = np.full(6, 9, np.int64)
    table.ids([None, "a"], out)
    assert out.tolist() == [0, 1, 9, 9, 9, 9]
    with pytest.raises(KeyError, match="'zzz' is not resident"):
        table.ids(["zzz"])


def test_read_adapter_refuses_other_layouts_and_altered_files(tmp_path):
    lay = layout()
    make_adapter(tmp_path / "a", lay, seed=0)
    other = SlotLayout("gather", 2, 4, "float32", SITES)  # another slot rank
    with pytest.raises(AdapterError, match="converted for another base export"):
        read_adapter(tmp_path / "a", other)
    with pytest.raises(AdapterError, match="is not a converted adapter"):
        read_adapter(tmp_path, lay)
    weights = tmp_path / "a" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="differs from the export"):
        read_adapter(tmp_path / "a", lay)
    assert read_adapter(tmp_path / "a", lay, hashes=False).tensors  # sizes still match
    weights.write_bytes(bytes(data[:-4]))
    with pytest.raises(AdapterError, match="truncated or replaced"):
        read_adapter(tmp_path / "a", lay, hashes=False)
