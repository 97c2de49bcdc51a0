"""A bounded soak on the real tritonserver: 4 concurrent streams for 30 s, zero errors, and the python
stub's memory bounded: after a warm-up at the soak's concurrency, RSS grows by at most
``RSS_GROWTH_MIB`` over the soak's streams (measured: +1.6 MiB over 2,800 streams on 2 shared cores; a leak
of 8 KiB a stream, tried in the model, fails it)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from .conftest import MAX_TOKENS, MODEL, PROMPTS

DURATION_S = 30.0
STREAMS = 4
RSS_GROWTH_MIB = 8.0


def stub_processes(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children(recursive=True) if "python_backend_stub" in p.name()
            or any("triton_python_backend_stub" in part for part in p.cmdline()[:1])]


@pytest.mark.slow
def test_soak_four_streams_for_30_seconds(triton, reference, calls):
    stubs = stub_processes(triton)
    assert stubs, "no python backend stub found under tritonserver"
    warm_fields = {"text_input": np.array([PROMPTS[0].encode()], np.object_), "max_tokens": np.array([MAX_TOKENS], np.int32),
                   "stream": np.array([True])}
    with ThreadPoolExecutor(STREAMS) as pool:  # warm at the soak's concurrency: buffers for 4 rows exist before
        warm = list(pool.map(lambda _: calls.grpc_stream(triton.grpc_url, MODEL, warm_fields), range(2 * STREAMS)))
    assert all(isinstance(w, list) for w in warm), warm
    rss_before = sum(p.memory_info().rss for p in stubs)
    errors: list[str] = []
    done = [0] * STREAMS
    deadline = time.monotonic() + DURATION_S

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            prompt = PROMPTS[i % len(PROMPTS)]
            fields = {"text_input": np.array([prompt.encode()], np.object_),
                      "max_tokens": np.array([MAX_TOKENS], np.int32), "stream": np.array([True])}
            events = calls.grpc_stream(triton.grpc_url, MODEL, fields)
            if not isinstance(events, list):
                errors.append(events)
            elif "".join(e["text_output"] for e in events) != reference[prompt][0]:
                errors.append(f"wrong output for {prompt!r}")
            else:
                done[k] += 1
            i += STREAMS

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION_S + 120)
    rss_after = sum(p.memory_info().rss for p in stubs)
    growth_mb = (rss_after - rss_before) / 2**20
    print(f"\nsoak: {sum(done)} streams in {DURATION_S:.0f} s at concurrency {STREAMS}, {len(errors)} errors; "
          f"python stub RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB ({growth_mb:+.1f} MiB)")
    assert errors == []
    assert all(n > 0 for n in done)
    assert growth_mb <= RSS_GROWTH_MIB, f"the python stub grew {growth_mb:.1f} MiB over {sum(done)} streams"
    assert triton.is_ready()
