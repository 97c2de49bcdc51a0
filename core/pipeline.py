"""The one pipeline `loraship ship` and `loraship demo` run: merge, export, verify, repo, then a target.

Each step calls the same library function as its command (imported inside the step, so this
module stays light and the layers below it never depend on one another through it):

* ``merge`` (export.merge), ``export`` (export.onnx_export), ``verify`` (export.verify),
  ``repo`` (triton_repo.layout);
* target ``local``: triton_repo.serve's ``serve_foreground``, exactly what `loraship serve` runs,
  with a first request through ``ask``;
* target ``azure``: infra.provisioner's ``provision`` and infra.deploy's ``deploy``, with the
  container's wheels staged (triton_repo.wheels).

A state file in the work folder records each finished step's input fingerprint (file sizes and
modification times of local inputs, the options) and output fingerprint. A re-run skips every
step whose inputs and output are unchanged, so an interrupted ship resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError

STATE = ".loraship-state.json"
DEMO_MODEL = "demo"
DEMO_QUESTIONS = 3
SMOKE_PROMPT = "Hello"
RUNTIME_DIRS = ("__pycache__", "trt_cache")


# -- fingerprints ------------------------------------------------------------------------------------

def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tree_state(path: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, int, int]] | None:
    """(relative name, size, mtime_ns) of every file under ``path`` (or of the file itself); None if missing.

    Hidden files and what Python and the TensorRT provider write while serving (``__pycache__``,
    ``trt_cache``) are left out, so serving a version does not change its fingerprint."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return None
    rows = []
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path)
        if item.is_file() and rel.as_posix() not in skip and not any(
                part.startswith(".") or part in RUNTIME_DIRS for part in rel.parts):
            stat = item.stat()
            rows.append((rel.as_posix(), stat.st_size, stat.st_mtime_ns))
    return rows


def source_state(source: str | Path) -> Any:
    """A local folder's files, or a hub id as given."""
    return tree_state(Path(source)) if Path(source).exists() else str(source)


def export_state(onnx: Path) -> Any:
    """An export's files and manifest, without the verify report that `verify` adds to the manifest."""
    from loraship.engine.manifest import MANIFEST, Manifest

    manifest = Manifest.read(onnx).replace(verify=None).to_dict() if (Path(onnx) / MANIFEST).is_file() else None
    return [tree_state(onnx, skip=(MANIFEST,)), manifest]


# -- the step runner ---------------------------------------------------------------------------------

@dataclass
class StepRecord:
    """One row of the summary table."""

    name: str
    result: str  # done | skipped | failed
    seconds: float
    detail: str


class Pipeline:
    """Runs steps in a work folder, skipping those a previous run finished with the same inputs."""

    def __init__(self, work: Path, console: Any = None, force: bool = False) -> None:
        from rich.console import Console

        self.work = Path(work)
        self.console = console or Console(stderr=True)
        self.records: list[StepRecord] = []
        if self.work.exists() and not self.work.is_dir():
            raise LorashipError(f"--out {self.work} is a file", "choose a directory path")
        if self.work.is_dir() and any(self.work.iterdir()) and not (self.work / STATE).is_file() and not force:
            raise LorashipError(f"output directory {self.work} exists, is not empty and holds no earlier run",
                                "pass --force to replace what is in it, or choose another --out")
        self.state: dict[str, dict] = {} if force else self._read_state()

    def _read_state(self) -> dict[str, dict]:
        try:
            return json.loads((self.work / STATE).read_text()).get("steps", {})
        except (OSError, ValueError, AttributeError):
            return {}

    def _save(self) -> None:
        from loraship.fsutil import write_json_atomic

        write_json_atomic(self.work / STATE, {"steps": self.state})

    def path(self, name: str) -> Path:
        return self.work / name

    def step(self, name: str, title: str, inputs: Any, run: Callable[[], dict], output: Callable[[dict], Any] = lambda r: None,
             spinner: bool = True, rerun: bool = False) -> dict:
        """Run ``run`` (it returns a record: ``detail`` for the summary, plus anything later steps need),
        unless the last run finished this step with the same ``inputs`` and an unchanged ``output(record)``."""
        key = fingerprint(inputs)
        done = self.state.get(name)
        if not rerun and done and done.get("inputs") == key and done.get("output") == fingerprint(output(done)):
            self.console.print(f"[cyan]\u21b7[/] {title} [dim](unchanged since the last run: skipped)[/]")
            self.records.append(StepRecord(name, "skipped", 0.0, done.get("detail", "")))
            return done
        self.state.pop(name, None)
        start = time.perf_counter()
        try:
            if spinner:
                with self.console.status(f"{title}..."):
                    record = run()
            else:
                self.console.print(f"[bold]\u2192[/] {title}")
                record = run()
        except BaseException:
            self.records.append(StepRecord(name, "failed", time.perf_counter() - start, ""))
            if self.work.is_dir():
                self._save()
            raise
        seconds = time.perf_counter() - start
        self.console.print(f"[green]\u2713[/] {title} [dim]({seconds:.1f}s)[/]")
        self.state[name] = {**record, "inputs": key, "output": fingerprint(output(record))}
        self.work.mkdir(parents=True, exist_ok=True)
        self._save()
        self.records.append(StepRecord(name, "done", seconds, record.get("detail", "")))
        return self.state[name]

    def note(self, name: str, detail: str, seconds: float = 0.0) -> None:
        """A summary row for work done outside ``step`` (provisioning, serving, a first request)."""
        self.records.append(StepRecord(name, "done", seconds, detail))

    def summary(self, title: str) -> Any:
        from rich.table import Table

        table = Table(title=title)
        for col in ("step", "result", "time", "detail"):
            table.add_column(col)
        colors = {"done": "green", "skipped": "cyan", "failed": "red"}
        for r in self.records:
            table.add_row(r.name, f"[{colors.get(r.result, 'white')}]{r.result}[/]",
                          f"{r.seconds:.1f}s" if r.result == "done" else "", r.detail)
        return table


# -- the steps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportOptions:
    """`loraship export` options; None takes export_onnx's own default."""

    engine: str | None = None
    dtype: str | None = None
    int4: bool = False
    target: str | None = None

    def resolved(self) -> dict[str, Any]:
        """Every option with export_onnx's defaults filled in (so a changed default re-runs the export)."""
        import inspect

        from loraship.export.onnx_export import export_onnx

        defaults = inspect.signature(export_onnx).parameters
        return {k: defaults[k].default if v is None else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Tolerances:
    """`loraship verify` bounds; None takes the export dtype's default."""

    atol: float | None = None
    min_agreement: float | None = None


def merge_step(p: Pipeline, base: str | Path, adapter: Path) -> dict:
    def run() -> dict:
        from loraship.export.merge import merge

        merge(base, adapter, p.path("merged"), force=True)
        return {"detail": f"{adapter} into {base}"}

    return p.step("merge", f"merging {adapter} into {base} (merge)", ["merge", source_state(base), source_state(adapter)],
                  run, output=lambda r: tree_state(p.path("merged")))


def export_step(p: Pipeline, opts: ExportOptions) -> dict:
    options = opts.resolved()

    def run() -> dict:
        from loraship.engine.manifest import Manifest
        from loraship.export.onnx_export import export_onnx

        export_onnx(p.path("merged"), p.path("onnx"), force=True, console=p.console, **options)
        made = Manifest.read(p.path("onnx"))
        return {"detail": f"{made.engine} {made.dtype} for {options['target']}", **options}

    return p.step("export", "exporting to ONNX (export)", ["export", tree_state(p.path("merged")), options], run,
                  output=lambda r: export_state(p.path("onnx")), spinner=False)


def verify_step(p: Pipeline, tol: Tolerances = Tolerances()) -> dict:
    def run() -> dict:
        from loraship.export.verify import check, verify

        report = verify(p.path("merged"), p.path("onnx"), atol=tol.atol, min_agreement=tol.min_agreement)
        check(report)  # past tolerance: stops the pipeline with the figures
        detail = f"max |logit diff| {report.max_abs_logit_diff:.2e}, greedy tokens {report.token_agreement:.0%} identical"
        evaluated = {}
        if report.eval is not None:  # the export carries an eval set (eval.jsonl, from the adapter)
            evaluated = {"eval_correct": sum(report.eval.engine.correct), "eval_cases": len(report.eval.engine.correct)}
            detail += f", eval set {evaluated['eval_correct']}/{evaluated['eval_cases']} through the engine"
        return {"detail": detail, "max_abs_logit_diff": report.max_abs_logit_diff,
                "token_agreement": report.token_agreement, **evaluated}

    return p.step("verify", "checking ONNX Runtime against PyTorch (verify)",
                  ["verify", tree_state(p.path("merged")), export_state(p.path("onnx")), asdict(tol)], run)


def repo_step(p: Pipeline, model: Any) -> dict:
    """Version N+1 of ``model`` (a ModelOptions) in WORK/repo; skipped while that version is unchanged."""
    def run() -> dict:
        from loraship.triton_repo.layout import write_version

        result = write_version(p.path("onnx"), p.path("repo"), model)
        version = result.version_dir.relative_to(p.work).as_posix()
        return {"detail": f"{version} ({model.provider}, {model.instances} x batch {model.max_batch_size})", "version": version}

    def output(record: dict) -> Any:
        version = p.path(record["version"])
        return [tree_state(version), tree_state(version.parent / "config.pbtxt")]

    return p.step("repo", f"laying out the Triton model repository (repo, model {model.name})",
                  ["repo", export_state(p.path("onnx")), asdict(model)], run, output=output)


def build(p: Pipeline, base: str | Path, adapter: Path, model: Any, export: ExportOptions = ExportOptions(),
          tol: Tolerances = Tolerances(), gpu_gib: float | None = None) -> Path:
    """merge -> export -> verify -> repo; the repository's path. On a GPU the model is fitted to it first
    (``fit_to_gpu``; ``gpu_gib``: the memory of the GPU it will run on, where known)."""
    merge_step(p, base, adapter)
    export_step(p, export)
    verify_step(p, tol)
    repo_step(p, fit_to_gpu(model, p.path("onnx"), gpu_gib))
    return p.path("repo")


GPU_HEADROOM_GIB = 1.5  # per instance, beside its weights and KV rows: the CUDA context and activations


def fit_to_gpu(model: Any, onnx: Path, gpu_gib: float | None) -> Any:
    """The served model's options (a ModelOptions) for a GPU: CUDA graphs for an export that shares its KV
    cache (CUDA provider), and where the GPU's memory is known, a KV budget of what it holds beside each
    instance's weights (+10%) and ``GPU_HEADROOM_GIB``. Options the user set are kept."""
    from loraship.engine.kv_rows_cache import GIB
    from loraship.engine.manifest import Manifest

    if model.provider == "cpu":
        return model
    manifest = Manifest.read(onnx)
    changes: dict[str, Any] = {}
    if model.provider == "cuda" and manifest.shares_kv:
        changes["cuda_graph"] = True
    if gpu_gib and model.kv_budget_gb is None:
        weights = sum(e["size"] for name, e in (manifest.files or {}).items() if name.startswith(manifest.model_name)) / GIB
        budget = gpu_gib / model.instances - 1.1 * weights - GPU_HEADROOM_GIB
        if budget <= 0:
            raise LorashipError(f"a {gpu_gib:.0f} GiB GPU holds {model.instances} instance(s) of {weights:.1f} GiB of weights "
                                "but no KV cache beside them", "choose a larger gpuProfileType, fewer --instances, or --int4")
        changes["kv_budget_gb"] = round(budget, 2)
    return replace(model, **changes)


def stream_reply(client: Any, prompt: Any, max_tokens: int, console: Any) -> Any:
    """Stream one reply (to text or a chat), printing it as it arrives; its Completion."""
    stream = client.stream(prompt, max_tokens=max_tokens)
    for chunk in stream:
        console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
    return stream.completion


def ask(url: str, protocol: str, model: str, prompt: str, max_tokens: int, console: Any, api_key: str | None = None) -> Any:
    """Stream one reply from the served model, printing it as it arrives; its Completion."""
    from loraship.client.client import Client

    console.print(f"[dim]prompt:[/] {prompt}\n[dim]reply:[/]  ", end="")
    with Client(url, protocol=protocol, model=model, api_key=api_key) as client:
        done = stream_reply(client, prompt, max_tokens, console)
    console.print()
    return done


# -- targets -----------------------------------------------------------------------------------------

def serve_local(p: Pipeline, model: str, serve: Any, out: Any, debug: bool = False, title: str = "loraship ship") -> None:
    """Serve WORK/repo in the foreground like `loraship serve`: endpoints, a sample curl, a first reply and
    the summary, then until Ctrl-C. ``serve`` is a ServeOptions; ``out`` the console for results (stdout)."""
    from loraship.triton_repo.serve import serve_foreground

    server = serve.server(p.path("repo"))
    start = time.perf_counter()

    def ready(server: Any) -> None:
        p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
        done = ask(server.grpc_url, "grpc", model, SMOKE_PROMPT, 16, out, api_key=serve.api_key)
        p.note("first request", f"{done.completion_tokens} tokens, the first after {done.ttft_s * 1000:.0f} ms", done.total_s)
        out.print(p.summary(title))

    serve_foreground(server, lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
                     lambda line: p.console.print(line, markup=False, highlight=False, soft_wrap=True), on_ready=ready, debug=debug)


@dataclass
class AzureTarget:
    """Where and how `ship --target azure` provisions and deploys (what `loraship azure` takes)."""

    params: Any  # loraship.infra.params.Params
    settings: Any  # loraship.infra.clients.Settings
    resource_group: str
    config_path: Path
    api_key: str | None = None
    what_if: bool = False
    create_resource_group: bool = False
    wheels: Path | None = None  # already staged; default: staged into WORK/wheels
    log: Callable[[str], None] = field(default=lambda _: None)


def what_if(az: AzureTarget) -> Any:
    """What provisioning would change; nothing is written."""
    from loraship.infra.provisioner import provision

    return provision(az.params, az.settings, az.resource_group, what_if=True, api_key=az.api_key,
                     create_resource_group=az.create_resource_group, config_path=az.config_path, log=az.log)


def wheels_step(p: Pipeline, az: AzureTarget) -> Path:
    """The onnxruntime-gpu/tokenizers/numpy wheels for the NGC image: given, or staged beside WORK/repo."""
    if az.wheels is not None:
        p.note("wheels", f"{az.wheels} (given)")
        return Path(az.wheels)
    from loraship.triton_repo import wheels

    def run() -> dict:
        dest = wheels.stage_wheels(p.path("repo"), az.params.tritonImageTag)
        return {"detail": f"{len(list(dest.glob('*.whl')))} wheels for Python {wheels.PYTHON_VERSION} in {dest.name}/"}

    p.step("wheels", "downloading the container's wheels (repo --stage-wheels)",
           ["wheels", wheels.packages(az.params.tritonImageTag), wheels.PYTHON_VERSION, wheels.PLATFORMS], run,
           output=lambda r: tree_state(wheels.wheels_dir(p.path("repo"))))
    return wheels.wheels_dir(p.path("repo"))


def ship_azure(p: Pipeline, az: AzureTarget, model: str, out: Any) -> Any:
    """Stage the wheels, provision (idempotent), then deploy WORK/repo; the DeployResult (None if skipped)."""
    from loraship.infra.deploy import deploy, usage
    from loraship.infra.provisioner import key_hint, provision, steps_table

    staged = wheels_step(p, az)
    start = time.perf_counter()
    with p.console.status("provisioning Azure (azure provision)..."):
        result = provision(az.params, az.settings, az.resource_group, api_key=az.api_key,
                           create_resource_group=az.create_resource_group, config_path=az.config_path, log=az.log)
    out.print(steps_table(result, "provisioned"))
    app_changed = any(s.resource == "container app" and s.action != "unchanged" for s in result.steps)
    p.note("provision", f"{result.writes} created or updated, {len(result.steps) - result.writes} unchanged",
           time.perf_counter() - start)

    def run() -> dict:
        done = deploy(az.params, az.settings, az.resource_group, p.path("repo"), wheels=staged, model=model,
                      config_path=az.config_path, log=az.log)
        return {"detail": f"revision {done.revision}", "endpoint": done.endpoint, "reply": done.reply}

    repo_version = p.path(p.state["repo"]["version"])
    record = p.step("deploy", "uploading, rolling a revision and smoke-testing it (azure deploy)",
                    ["deploy", tree_state(repo_version), tree_state(staged), asdict(az.params), az.resource_group,
                     az.settings.subscription_id], run, spinner=False, rerun=app_changed)
    out.print(p.summary("loraship ship"))
    out.print(f"endpoint: {record['endpoint']}  (model {model}; first reply {record.get('reply', '')!r})", soft_wrap=True)
    out.print("Call it:")
    out.print(usage(record["endpoint"], model, key_hint(az.params, az.resource_group), az.params.apiKeyHeader), soft_wrap=True)
    return record


# -- the two commands --------------------------------------------------------------------------------

def default_name(adapter: Path) -> str:
    """A model name from the adapter folder's name: its ASCII letters, digits, '-' and '_' (others become
    '-'), as :func:`loraship.triton_repo.config.check_model_name` wants."""
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in Path(adapter).resolve().name)
    return name.strip("-")[:128].rstrip("-") or "model"


def ship(base: str | Path, adapter: Path, work: Path, name: str | None = None, target: str = "local",
         export: ExportOptions = ExportOptions(), tol: Tolerances = Tolerances(), instances: int = 1,
         max_batch_size: int = 8, provider: str | None = None, serve: Any = None, azure: AzureTarget | None = None,
         force: bool = False, console: Any = None, out: Any = None, debug: bool = False) -> None:
    """base + adapter -> merge -> export -> verify -> repo -> a local endpoint (served until Ctrl-C) or an
    Azure Container Apps deployment. ``provider`` defaults to cpu locally and cuda on Azure (its GPU)."""
    from rich.console import Console

    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.serve import ServeOptions

    if target not in ("local", "azure"):
        raise LorashipError(f"unknown --target {target!r}", "choose local or azure")
    if target == "azure" and azure is None:
        raise LorashipError("--target azure needs the Azure subscription and resource group", "pass --subscription and -g")
    name = name or default_name(adapter)
    model = ModelOptions(name=name, instances=instances, max_batch_size=max_batch_size,
                         provider=provider or ("cuda" if target == "azure" else "cpu"))
    if model.provider != "cpu" and export.engine != "optimum":  # a GPU serves the builder's CUDA graph, fp16 unless asked
        export = replace(export, dtype=export.dtype or "fp16", target=export.target or "cuda")
    model.validate()  # before any long step
    if target == "local":
        (serve or ServeOptions()).check_ports()  # a busy port is refused before the build, not after it
    if azure is not None:  # a replica takes as many requests as the model serves at once, then ACA adds one
        azure = replace(azure, params=replace(azure.params, scaleConcurrentRequests=instances * max_batch_size).validate())
    out = out or Console()
    if azure is not None and azure.what_if:  # the plan only: nothing local runs, nothing in Azure changes
        from loraship.infra.provisioner import steps_table

        out.print(steps_table(what_if(azure), "what-if: nothing was changed"))
        return
    p = Pipeline(work, console, force)
    gpu_gib = None
    if azure is not None:
        from loraship.infra.plan import PROFILE_GPU_GIB

        gpu_gib = PROFILE_GPU_GIB[azure.params.gpuProfileType]
    build(p, base, adapter, model, export, tol, gpu_gib)
    if target == "local":
        serve_local(p, name, serve or ServeOptions(), out, debug)
    else:
        ship_azure(p, azure, name, out)


@dataclass(frozen=True)
class Answer:
    """A held-out question asked through Triton, the reply, and the answer it should start with."""

    question: str
    expected: str
    reply: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class DemoResult:
    """Figures the demo prints in its summary."""

    out: Path
    max_abs_logit_diff: float
    token_agreement: float
    eval_correct: int
    eval_cases: int
    answers: list[Answer]

    @property
    def correct(self) -> int:
        return sum(a.correct for a in self.answers)

    @property
    def ttft_s(self) -> float:
        return sum(a.ttft_s for a in self.answers) / len(self.answers)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after each reply's first one (the streaming rate a user sees)."""
        tokens = sum(a.completion_tokens - 1 for a in self.answers)
        span = sum(a.total_s - a.ttft_s for a in self.answers)
        return tokens / span if tokens > 0 and span > 0 else 0.0


def pick_questions(cases: list, n: int = DEMO_QUESTIONS) -> list:
    """``n`` cases spread over an eval set (first, middle and last for three)."""
    return [cases[round(i * (len(cases) - 1) / max(n - 1, 1))] for i in range(min(n, len(cases)))]


def ask_questions(url: str, protocol: str, model: str, cases: list, max_tokens: int, console: Any) -> list[Answer]:
    """Ask each eval case as a chat (``messages``: the server applies the chat template), streaming each
    reply beside the answer it should start with."""
    from rich.markup import escape

    from loraship.client.client import Client
    from loraship.export.evalset import is_correct

    answers = []
    with Client(url, protocol=protocol, model=model) as client:
        for case in cases:
            console.print(f"[dim]question:[/] {escape(case.question)}\n[dim]reply:[/]    ", end="", highlight=False)
            done = stream_reply(client, list(case.messages), max_tokens, console)
            ok = is_correct(done.text, case.answer)
            verdict = "[green]\u2713 correct[/]" if ok else "[red]\u2717 wrong[/]"
            console.print(f"   [dim]expected:[/] {escape(case.answer)}  {verdict}", highlight=False)
            answers.append(Answer(case.question, case.answer, done.text, ok, done.prompt_tokens, done.completion_tokens,
                                  done.ttft_s, done.total_s))
    return answers


def run_demo(out: Path, arch: str = "phi3", size: str = "tiny", force: bool = False, max_tokens: int = 48,
             protocol: str = "grpc", console: Any = None) -> tuple[DemoResult, Pipeline]:
    """demo-model (trained) -> merge -> export -> verify -> repo -> serve -> three held-out questions, streamed."""
    from rich.console import Console

    from loraship.export.evalset import EVAL_FILE, read_eval
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.server import TritonServer

    console = console or Console()
    p = Pipeline(out, console, force)

    def demo_model() -> dict:
        from loraship.export.demo_model import demo_model, read_report

        demo_model(p.path("model"), arch=arch, size=size, force=True, console=p.console)
        made = read_report(p.path("model"))
        n = made["eval_cases"]
        return {"detail": f"{size} {arch} trained: held-out questions {round(made['base_accuracy'] * n)}/{n} by the base, "
                          f"{round(made['merged_accuracy'] * n)}/{n} fine-tuned"}

    p.step("demo-model", f"training a {size} {arch} base and a LoRA fine-tune that writes numbers in words (demo-model)",
           ["demo-model", arch, size], demo_model, output=lambda r: tree_state(p.path("model")), spinner=False)
    build(p, p.path("model") / "base", p.path("model") / "adapter", ModelOptions(name=DEMO_MODEL))
    start = time.perf_counter()
    with console.status("starting tritonserver (serve)..."):
        server = TritonServer(p.path("repo")).start()
    p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
    try:
        console.print(f"[bold]{DEMO_MODEL}[/] at {server.http_url} (HTTP) and {server.grpc_url} (gRPC); "
                      f"{DEMO_QUESTIONS} held-out questions as chats:")
        answers = ask_questions(server.grpc_url if protocol == "grpc" else server.http_url, protocol, DEMO_MODEL,
                                pick_questions(read_eval(p.path("onnx") / EVAL_FILE)), max_tokens, console)
    finally:
        server.stop()
    verified = p.state["verify"]
    return DemoResult(p.work, verified["max_abs_logit_diff"], verified["token_agreement"], verified["eval_correct"],
                      verified["eval_cases"], answers), p


def demo_summary(result: DemoResult) -> Any:
    from rich.table import Table

    table = Table(title="loraship demo", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("parity: max |logit diff|", f"{result.max_abs_logit_diff:.2e} (ONNX Runtime vs PyTorch)")
    table.add_row("parity: greedy tokens", f"{result.token_agreement:.0%} identical")
    table.add_row("eval set through the engine", f"{result.eval_correct}/{result.eval_cases} held-out questions correct")
    table.add_row("fine-tune answers correct through Triton", f"{result.correct}/{len(result.answers)}")
    table.add_row("tokens", f"{sum(a.prompt_tokens for a in result.answers)} prompt, "
                            f"{sum(a.completion_tokens for a in result.answers)} generated")
    table.add_row("time to first token", f"{result.ttft_s * 1000:.1f} ms (mean)")
    table.add_row("decode speed", f"{result.decode_tokens_per_s:.0f} tokens/s")
    table.add_row("end to end", f"{sum(a.total_s for a in result.answers) * 1000:.0f} ms for {len(result.answers)} replies")
    table.add_row("serve again", f"loraship serve --repo {result.out}/repo")
    return table
