"""The generation engine: an exported decoder, its tokenizer, its batch and the requests' validation.

An engine on a base export with LoRA slots also serves adapters: :attr:`Engine.adapters` (an
:class:`~.adapter_registry.AdapterRegistry`) registers them by name, each request may name one (or
none: the base), and rows on different adapters decode in one run per step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .adapter_admission import SlotAdmission
from .adapter_registry import AdapterRegistry
from .adapters import SlotLayout, SlotTable
from .batch import Batch
from .detok import TextStream
from .errors import RequestError
from .kv_grown import KVGrownBatch
from .kv_grown_ops import KVGrownOps
from .kv_rows import KVRowsBatch
from .kv_rows_cache import GIB, KVPlan, KVRowsCache
from .manifest import Manifest, ManifestError
from .params import SamplingParams
from .prompt import TextBound, encode
from .request import Completion, DoneCallback, Request, TokenCallback
from .runner import Runner
from .scheduler import Scheduler
from .session import DecoderLayout, create_session


def _kv_dims(model_dir: Path, manifest: Manifest) -> tuple[int | None, int | None]:
    """KV heads and head size for exports whose ONNX shapes leave them symbolic (genai)."""
    genai = model_dir / "genai_config.json"
    if genai.is_file():
        decoder = json.loads(genai.read_text())["model"]["decoder"]
        return decoder.get("num_key_value_heads"), decoder.get("head_size")
    return manifest.kv_heads, manifest.head_dim


class Engine:
    """Runs greedy or sampled generation on an ONNX decoder exported by ``loraship export``."""

    def __init__(self, model_dir: Path, manifest: Manifest, tokenizer: Tokenizer, runner: Runner, max_batch: int = 8,
                 kv_budget_gb: float | None = None) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.runner = runner
        self.max_context = int(manifest.max_context)  # Engine.load refuses a manifest without it
        self.eos_ids = manifest.eos_ids
        self.pad_id = manifest.pad_token_id or 0
        self.kv: KVRowsCache | None = None
        self.kv_ops = None if manifest.shares_kv else KVGrownOps(runner)
        slots = SlotLayout.from_manifest(manifest) if manifest.lora_slots else None
        if slots is not None and not (manifest.shares_kv and runner.layout.lora_ids):
            raise RequestError(f"{model_dir} records LoRA slots, but its decoder has no lora_ids input; re-run "
                               "`loraship export --max-adapters`")
        if manifest.shares_kv:
            budget = None if kv_budget_gb is None else int(kv_budget_gb * GIB)
            plan = KVPlan.of(runner.layout, self.max_context, max_batch, budget, slots)
            self.kv = KVRowsCache(runner.layout, plan, runner.device, runner.device_id)
        self.max_batch = self.kv.rows if self.kv else max_batch
        self.adapters: AdapterRegistry | None = None  # the adapters served by name (a base export with LoRA slots)
        self._admission: SlotAdmission | None = None
        self.slot_buffers = None  # what the decoder reads the slots from: the table's host arrays, or their device copies
        if slots is not None:
            table = SlotTable(slots)
            self.adapters = AdapterRegistry(table)
            self._admission = SlotAdmission(self.adapters)
            if runner.on_device:
                from .device_slots import DeviceSlots

                self.slot_buffers = DeviceSlots(table, runner)
            else:
                self.slot_buffers = table
        self.vocab = runner.layout.vocab or tokenizer.get_vocab_size(with_added_tokens=True)  # the ids a prompt may hold
        self.text_bound = TextBound.of(tokenizer, self.max_context)  # texts longer than this are never tokenized

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        provider: str = "cpu",
        trt_cache_dir: str | Path | None = None,
        threads: int | None = None,
        device_id: int = 0,
        max_batch: int = 8,
        trt_fp16: bool = False,
        trt_profile: tuple[int, int, int] | None = None,
        spin: bool = True,
        cuda_graph: bool = False,
        max_context: int | None = None,
        kv_budget_gb: float | None = None,
    ) -> "Engine":
        """Open an export folder (its manifest, ``tokenizer.json`` and the ONNX file).

        ``max_batch`` requests decode together at most. For genai (GroupQueryAttention) exports the
        KV cache is allocated here: ``max_batch`` rows of ``max_context`` positions, or as many rows
        as ``kv_budget_gb`` holds (:attr:`kv_plan` says what was planned). ``cuda_graph`` (CUDA,
        genai exports) replays each decode step as a captured CUDA graph, one per batch width.
        ``max_context`` caps the model's context (and with it each KV row's size).
        """
        model_dir = Path(model_dir)
        try:
            manifest = Manifest.read(model_dir)
        except ManifestError as exc:
            raise RequestError(f"{exc}; point at a folder written by `loraship export`") from None
        if not manifest.max_context:
            raise RequestError(f"the manifest of {model_dir} gives no max_context; re-run `loraship export`")
        if max_context:
            manifest = manifest.replace(max_context=min(manifest.max_context, max_context))
        if cuda_graph and (provider != "cuda" or not manifest.shares_kv):
            raise RequestError("CUDA graphs need provider 'cuda' and a GroupQueryAttention export "
                               "(`loraship export --dtype fp16 --target cuda`)")
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        kv_dims = _kv_dims(model_dir, manifest)
        session = create_session(
            model_dir / manifest.model_name,
            provider=provider,
            threads=threads,
            trt_cache_dir=Path(trt_cache_dir) if trt_cache_dir else None,
            trt_fp16=trt_fp16,
            device_id=device_id,
            max_batch=max_batch,
            max_context=manifest.max_context,
            kv_dims=kv_dims,
            trt_profile_tokens=trt_profile,
            spin=spin,
            cuda_graph=cuda_graph,
        )
        runner = Runner(session, DecoderLayout.of(session, *kv_dims), device_id, cuda_graph=cuda_graph)
        return cls(model_dir, manifest, tokenizer, runner, max_batch=max_batch, kv_budget_gb=kv_budget_gb)

    @property
    def kv_plan(self) -> KVPlan | None:
        """The KV rows planned at load (genai exports), or None where the cache grows per step."""
        return self.kv.plan if self.kv else None

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return self.runner.session.get_providers()

    def encode(self, text: str, add_special_tokens: bool = True, what: str = "text_input") -> list[int]:
        """Token ids of ``text`` (the ``what`` input): refused in one line, untokenized, if it is longer
        than the context could ever hold; the GIL is released while the tokenizer runs."""
        self.text_bound.check(text, what)
        return encode(self.tokenizer, text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_token: TokenCallback | None = None,
        on_done: DoneCallback | None = None,
        adapter: str | None = None,
    ) -> Request:
        """Tokenize and validate one request; :class:`RequestError` names what cannot be served. ``adapter``
        names a registered adapter (:attr:`adapters`); None is the base model. An adapter that is not
        registered is refused (``UnknownAdapter``), never served by the base."""
        params.check_types()
        lora = None
        if adapter is not None:
            if self.adapters is None:
                raise RequestError(f"this model serves no adapters, so adapter {adapter!r} cannot be chosen; leave it out")
            lora = self.adapters.resolve(adapter)
        self.text_bound.check("".join(params.stop), "stop")  # longer than any output: it could never match
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        params.validate(len(ids), self.max_context)  # before a long list of ids is converted
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is not in the model's vocabulary (0 to {self.vocab - 1}); send ids from its tokenizer")
        return Request(ids, params, TextStream(self.tokenizer, tuple(params.stop)), on_token, on_done, adapter=adapter,
                       lora=lora)

    def new_batch(self) -> Batch:
        """An empty batch for this export's KV strategy: its KV rows (GroupQueryAttention), or a
        left-padded grown cache. A KV-rows engine has one batch at a time (it owns the rows until
        ``close()``)."""
        if self.kv is not None:
            return KVRowsBatch(self.runner, self.kv, self.eos_ids, self.pad_id, self.slot_buffers)
        return KVGrownBatch(self.runner, self.kv_ops, self.eos_ids, self.pad_id, self.max_batch)

    def prefill_logits(self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[str | None] | None = None) -> np.ndarray:
        """Last-position logits ``[B, V]`` of the prompts (each on its adapter in ``adapters``, by name)."""
        names = self._adapter_names(prompts, adapters)
        requests = [self.request(p, SamplingParams(max_tokens=1), adapter=a) for p, a in zip(prompts, names)]
        batch = self.new_batch()
        try:
            logits = []
            for request in requests:  # each alone, holding its adapter's slot meanwhile
                if request.lora is not None and not self._admission.take(request):
                    raise RequestError("every LoRA slot is in use by a running scheduler; submit to it instead")
                try:
                    logits.append(batch.prefill_logits([request]))
                finally:
                    if request.lora is not None:
                        self._admission.give(request)
            return np.concatenate(logits)
        finally:
            batch.close()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_token: Callable[[int, int, str], None] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Generate for a batch of prompts, ``max_batch`` at a time, the rest joining as rows free up;
        ``on_token(index, token_id, text_delta)`` streams; ``adapters`` names each prompt's adapter (None:
        the base). A request that fails raises its error once all are done."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(per_prompt)} sampling parameter sets")
        names = self._adapter_names(prompts, adapters)

        def callback(index: int) -> TokenCallback | None:
            return None if on_token is None else (lambda token, delta, _logprob: on_token(index, token, delta))

        requests = [self.request(p, sp, callback(i), adapter=a) for i, (p, sp, a) in enumerate(zip(prompts, per_prompt, names))]
        scheduler = Scheduler(self.new_batch(), self.request, self._admission)
        try:
            for request in requests:
                scheduler.enqueue(request)
            scheduler.run_until_done()
        finally:
            scheduler.close()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [request.completion for request in requests]

    def scheduler(self, start: bool = True) -> Scheduler:
        """Start in-flight batching: a thread that decodes all active requests together (up to
        ``max_batch``; later requests wait, first come first served; on adapters, by the rule of
        :mod:`.adapter_admission`). ``start=False``: no thread; the caller runs ``step()``."""
        scheduler = Scheduler(self.new_batch(), self.request, self._admission)
        return scheduler.start() if start else scheduler

    @staticmethod
    def _adapter_names(prompts: Sequence, adapters: Sequence[str | None] | None) -> list[str | None]:
        names = [None] * len(prompts) if adapters is None else list(adapters)
        if len(names) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(names)} adapter names")
        return names
