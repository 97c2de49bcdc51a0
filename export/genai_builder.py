"""The onnxruntime-genai model builder (0.15.2, the last one that runs beside transformers 4.57), and the
config translations that work around its bugs.

The builder runs as its command line does (``python -m onnxruntime_genai.models.builder``), in a child process
forked from a helper that imported it once (:class:`_BuilderServer`), on a view of the merged folder whose
``config.json`` :func:`builder_config` has translated: each build still gets its own process, which frees the
model's memory when it ends, but a second build from one process (the support matrix, a test session) skips
the 5-10 s of importing torch, transformers and the builder. Which architectures it builds is read
from the installed builder itself (:func:`builder_architectures`), so a note that it does not build one is
true. Whether what it built is right is not assumed: ``export`` probes every build against PyTorch
(``loraship.export.verify.probe``) and falls back to optimum when the probe fails.

Its bugs, and what loraship does about each (the support matrix, ``loraship.export.matrix``, shows the rest):

* LayerNorm epsilon: the builder reads only ``rms_norm_eps`` (else 1e-6) and ignores ``layer_norm_eps``
  (Phi-2) and ``norm_eps`` (Nemotron): :func:`builder_config` copies them into ``rms_norm_eps``.
* longrope: it takes the magnitude-scaling policy from ``rope_parameters["type"]``, which configs saved by
  transformers 5 (and loraship's, until this was fixed) do not have: ``hfcompat`` writes ``type`` beside
  ``rope_type`` (upstream PR #2609).
* Gemma-2: it puts the sliding window on the odd layers, transformers on the even ones (``layer_types``);
  no config key moves it, so the probe fails past the window and Gemma-2 exports with optimum. Gemma-3:
  its 5:1 local/global pattern is hard-coded; configs with another ``layer_types`` fail the probe the same way.
* OLMo: it emits RMSNorm for OLMo's weightless LayerNorm: the probe fails, OLMo exports with optimum.
* SmolLM3: it crashes (KeyError 'position_ids') on the layers without RoPE: SmolLM3 exports with optimum.
* longrope's switch to the long factors compares the attention mask's *width* with the original context.
  The loraship engine decodes from KV rows with capacity-wide masks, so every decode step took the long
  factors, even for a 10-token chat: :func:`patch_length_switch` makes the switch read the longest row's
  length (the mask's sum), which is what transformers compares too (the batch's largest position).
* The CPU fp16 graph (MultiHeadAttention) fails in ONNX Runtime 1.32's memory planner: fp16 for the CPU
  takes optimum, and ``--engine genai --dtype fp16`` needs ``--target cuda``.

The newer builders (0.16 to 0.18) read ``layer_types`` (fixing the two Gemma windows) but import
transformers-5-only classes, so they need their own environment; they leave the OLMo norm, the epsilons,
the SmolLM3 crash and longrope's ``type`` unfixed. README "Supported architectures" says why loraship
stays on 0.15.2.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


# Config keys that hold the LayerNorm epsilon where the builder reads only rms_norm_eps.
_EPSILON_KEYS = ("layer_norm_eps", "norm_eps", "layer_norm_epsilon")


@functools.cache
def builder_architectures() -> frozenset[str]:
    """The ``architectures[0]`` values the installed builder's ``create_model`` dispatches on."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return frozenset()
    source = Path(spec.origin).read_text()
    return frozenset(re.findall(r'config\.architectures\[0\] == "(\w+)"', source))


def builds(architecture: str) -> bool:
    """Whether the installed builder lists ``architecture``."""
    return architecture in builder_architectures()


def builder_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as the builder should read it (see the module docstring for the bug each line is for)."""
    config = dict(config)
    if "rms_norm_eps" not in config:
        for key in _EPSILON_KEYS:
            if key in config:
                config["rms_norm_eps"] = config[key]
                break
    return config


def build(model_dir: Path, out: Path, precision: str, target: str, work: Path) -> None:
    """Run the builder on ``model_dir`` through a view in ``work`` whose config.json is :func:`builder_config`'s."""
    from loraship.export.hfcompat import compat_view

    view = compat_view(model_dir, Path(work) / "builder-input")
    config_path = view / "config.json"
    config_path.write_text(json.dumps(builder_config(json.loads(config_path.read_text())), indent=2))
    args = ["-i", str(view), "-o", str(out), "-p", precision, "-e", target, "-c", str(Path(work) / "builder-cache")]
    log = Path(work) / "builder.log"
    code = _SERVER.run(args, log)
    if code != 0:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if "No space left" in text:
            raise OSError(28, "No space left on device", str(out))
        lines = [line for line in text.strip().splitlines() if line.strip()]
        raise BuildError(lines[-1] if lines else f"exit code {code}")
    patch_length_switch(Path(out) / "model.onnx")


class _BuilderServer:
    """A helper process (``python -m loraship.export.genai_builder``) that imports the builder once and forks a
    child per build, which runs the builder's command line with its output in a log and exits: every build
    still gets its own process (its model's memory goes when it ends), without importing again."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """End the helper (it exits at the end of its input) and wait for it, so none outlives this process."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, args: list[str], log: Path) -> int:
        with self._lock:
            for _ in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                try:
                    self._proc.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
                    self._proc.stdin.flush()
                    reply = self._proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    reply = ""
                if reply:
                    return int(json.loads(reply)["code"])
                self._proc = None  # the helper died (killed, out of memory): start another once
            return 1 if log.is_file() else 137


_SERVER = _BuilderServer()


def _serve() -> None:
    """The helper's loop: one JSON request a line on stdin, ``{"code": exit code}`` a line on stdout."""
    import os
    import runpy
    import traceback

    try:
        import onnxruntime_genai.models.builder  # noqa: F401 - imported once, before any fork
        broken = None
    except BaseException:  # noqa: BLE001 - every build then fails with the import's error
        broken = traceback.format_exc()
    for line in sys.stdin:
        request = json.loads(line)
        if broken is not None:
            Path(request["log"]).write_text(broken)
            sys.stdout.write(json.dumps({"code": 1}) + "\n")
            sys.stdout.flush()
            continue
        pid = os.fork()
        if pid == 0:  # the child: the builder's command line, its output (and any traceback) into the log
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["onnxruntime_genai.models.builder", *request["args"]]
            code = 0
            try:
                runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - the traceback's last line is the error export reports
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"code": code}) + "\n")
        sys.stdout.flush()
    os._exit(0)  # input closed: no interpreter teardown (torch's takes a while)


def patch_length_switch(model_file: Path) -> bool:
    """Make the builder's longrope switch compare the longest row's length, ``max(sum(attention_mask, 1))``,
    instead of the attention mask's width; True if the graph had one. GroupQueryAttention wants a cos/sin
    cache as long as the mask is wide, so the short-factor cache is padded with zero rows to the long one's
    length: the short branch is taken only while every row is within the original context, so the padding
    is never read. Only model.onnx is rewritten (the weights stay in the external data file)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}

    def is_mask_width(name: str) -> bool:
        gather = producers.get(name)
        if gather is None or gather.op_type != "Gather":
            return False
        shape = producers.get(gather.input[0])
        return shape is not None and shape.op_type == "Shape" and shape.input[0] == "attention_mask"

    switches = [n for n in graph.node if n.op_type in ("Greater", "GreaterOrEqual") and is_mask_width(n.input[0])]
    if not switches:
        return False
    for node in graph.node:
        if node.op_type == "If" and any(node.input[0] == s.output[0] for s in switches):
            _pad_branches(node)
    axes, total, longest = "/loraship/mask_axis", "/loraship/mask_lengths", "/loraship/longest_row"
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
    first = list(graph.node).index(switches[0])
    graph.node.insert(first, helper.make_node("ReduceMax", [total], [longest], keepdims=0, name=longest))
    graph.node.insert(first, helper.make_node("ReduceSum", ["attention_mask", axes], [total], keepdims=0, name=total))
    for node in switches:
        node.input[0] = longest
    onnx.save(model, str(model_file))
    return True


def _pad_branches(node) -> None:
    """Pad each constant the If's branches output to the longer branch's rows, with zeros."""
    import numpy as np
    from onnx import numpy_helper

    branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    constants = {name: [n for n in g.node if n.op_type == "Constant"] for name, g in branches.items()}
    for pair in zip(*constants.values()):
        tensors = [numpy_helper.to_array(c.attribute[0].t) for c in pair]
        rows = max(t.shape[0] for t in tensors)
        for const, tensor in zip(pair, tensors):
            if tensor.shape[0] < rows:
                padded = np.concatenate([tensor, np.zeros((rows - tensor.shape[0], *tensor.shape[1:]), tensor.dtype)])
                const.attribute[0].t.CopyFrom(numpy_helper.from_array(padded, const.attribute[0].t.name))


class BuildError(Exception):
    """An engine failed to build; the message is one line (the builder's last, or optimum's exception)."""


if __name__ == "__main__":
    _serve()
