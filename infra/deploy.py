"""`loraship azure deploy`: upload, roll a new revision, wait until it serves, smoke-test it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship_contract import API_KEY_HEADER

from loraship.endpoint import sample_curl
from loraship.errors import LorashipError
from loraship.infra import plan
from loraship.infra.azerrors import azure_errors
from loraship.infra.clients import Clients, Settings, get_or_none, secret_value
from loraship.infra.files_upload import UploadResult, upload
from loraship.triton_repo.config import check_model_name
from loraship.triton_repo.layout import capacity, model_names
from loraship.infra.params import DEFAULT_CONFIG, Params, write_config


@dataclass
class DeployResult:
    endpoint: str
    revision: str
    model: str
    reply: str  # Triton's /v2 generate
    openai_reply: str  # /v1/chat/completions (or /v1/completions for a model without a chat template)
    openai_route: str
    upload: UploadResult


def wait_ready(clients: Clients, resource_group: str, app_name: str, revision: str, timeout_s: float, poll_s: float) -> Any:
    """Poll the app until ``revision`` is its latest ready revision."""
    deadline = time.monotonic() + timeout_s
    while True:
        with azure_errors(f"reading container app {app_name}", resource_group=resource_group):
            app = clients.app.container_apps.get(resource_group, app_name)
        props = app.properties
        if props.provisioning_state == "Failed":
            raise LorashipError(f"revision {revision} failed to provision", f"see `az containerapp logs show -n {app_name} -g {resource_group} --type system`")
        if props.latest_ready_revision_name == revision:
            return app
        if time.monotonic() > deadline:
            raise LorashipError(
                f"revision {revision} was not ready after {timeout_s:.0f} s (latest ready: {props.latest_ready_revision_name})",
                f"check `loraship azure status` and `az containerapp logs show -n {app_name} -g {resource_group}`",
            )
        time.sleep(poll_s)


def wait_serving(endpoint: str, timeout_s: float, poll_s: float, verify: Any = True) -> None:
    """Poll ``/v2/health/ready`` through the public ingress until Triton answers 200."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{endpoint}/v2/health/ready", timeout=30, verify=verify)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(poll_s)
    raise LorashipError(f"{endpoint}/v2/health/ready did not answer 200 within {timeout_s:.0f} s ({last})", "the model may still be loading; check `loraship azure status` and the app logs")


def smoke(endpoint: str, model: str, api_key: str) -> str:
    """One short greedy generate through the endpoint's /v2 (Triton's API) with the API key; the reply text."""
    from loraship.client.client import Client

    return Client(endpoint, "http", model, api_key=api_key, timeout=240).generate("Hello", max_tokens=8).text


def openai_smoke(endpoint: str, model: str, api_key: str, chat: bool, verify: Any = True) -> tuple[str, str]:
    """One short greedy request to the endpoint's OpenAI API with the key as a Bearer token: (route, reply text).

    A chat on /v1/chat/completions when the model has a chat template, else /v1/completions."""
    import requests

    route, prompt = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}) if chat else ("/v1/completions", {"prompt": "Hello"})
    url = f"{endpoint}{route}"
    try:
        response = requests.post(url, json={"model": model, "max_tokens": 8, "temperature": 0, **prompt},
                                 headers={"Authorization": f"Bearer {api_key}"}, timeout=240, verify=verify)
        data = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise LorashipError(f"{url} gave no OpenAI answer ({type(exc).__name__})", "check the app logs: did start.sh start the frontend?") from None
    if response.status_code == 401:
        raise LorashipError(f"{url} refused the API key", "check the app's API key secret")
    if response.status_code != 200:
        message = (data.get("error") or {}).get("message", response.text[:200]) if isinstance(data, dict) else response.text[:200]
        raise LorashipError(f"{url} answered HTTP {response.status_code}: {message}", "check the app logs")
    choice = data["choices"][0]
    return route, choice["message"]["content"] if chat else choice["text"]


def has_chat_template(repo: Path, model: str) -> bool:
    """Whether `loraship repo` recorded a chat template for ``model`` (its config.pbtxt parameter)."""
    from loraship.triton_repo.config import read_config

    parameters = read_config(Path(repo) / model / "config.pbtxt").parameters
    return "chat_template" in parameters and parameters["chat_template"].string_value == "1"


def deploy(
    p: Params,
    settings: Settings,
    resource_group: str,
    repo: Path,
    *,
    wheels: Path | None = None,
    model: str | None = None,
    config_path: Path = DEFAULT_CONFIG,
    timeout_s: float = 1800,
    poll_s: float = 10,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> DeployResult:
    """Upload ``repo``, roll a new revision that reloads it, wait until it serves, and smoke-test it."""
    p.validate()  # Azure's limits, before any request
    names = model_names(Path(repo))
    if model is None:
        if len(names) != 1:
            raise LorashipError(f"cannot tell which model to smoke-test in {repo} (found {names or 'none'})", "pass --model NAME")
        model = names[0]
    elif check_model_name(model, "--model") not in names:
        raise LorashipError(f"--model {model} is not in {repo} (found {names or 'none'})", "pass one of the repository's models")
    c = Clients(settings)
    ctx = {"resource_group": resource_group, "location": p.location}
    with azure_errors(f"reading container app {p.acaAppName}", **ctx):
        app = get_or_none(c.app.container_apps.get, resource_group, p.acaAppName)
        if app is None:
            raise LorashipError(f"container app {p.acaAppName} does not exist in {resource_group}", "run `loraship azure provision` first")
        api_key = secret_value(c, resource_group, p.acaAppName, p.apiKeySecretName)
    if not api_key:
        raise LorashipError(f"container app {p.acaAppName} has no {p.apiKeySecretName} secret", "run `loraship azure provision` to set the API key")

    threshold = capacity(Path(repo) / model) or plan.concurrent_requests(app)
    uploaded = upload(p, settings, resource_group, repo, wheels=wheels, progress=progress, log=log)
    suffix = time.strftime("d%y%m%d%H%M%S")
    desired = plan.container_app(
        p, app.properties.environment_id or app.properties.managed_environment_id, api_key,
        app.properties.workload_profile_name or plan.GPU_PROFILE_NAME, stamp=uploaded.digest[:16], revision_suffix=suffix,
        concurrent_requests=threshold,
    )
    log(f"scale: {p.minimumInstanceCount}..{p.maximumInstanceCount} replicas, one more past "
        f"{threshold or p.scaleConcurrentRequests} concurrent requests per replica")
    log(f"rolling revision {p.acaAppName}--{suffix}")
    with azure_errors(f"updating container app {p.acaAppName}", **ctx):
        c.app.container_apps.begin_create_or_update(resource_group, p.acaAppName, desired).result()
    revision = f"{p.acaAppName}--{suffix}"
    app = wait_ready(c, resource_group, p.acaAppName, revision, timeout_s, poll_s)
    endpoint = f"https://{app.properties.configuration.ingress.fqdn}"
    log(f"waiting for {endpoint}/v2/health/ready")
    wait_serving(endpoint, timeout_s, poll_s, settings.client_kwargs.get("connection_verify", True))
    reply = smoke(endpoint, model, api_key)
    route, openai_reply = openai_smoke(endpoint, model, api_key, has_chat_template(repo, model), settings.client_kwargs.get("connection_verify", True))
    write_config(config_path, settings.subscription_id, resource_group, p, endpoint)
    return DeployResult(endpoint, revision, model, reply, openai_reply, route, uploaded)


def usage(endpoint: str, model: str, key_command: str, header: str = API_KEY_HEADER) -> str:
    """How to call the endpoint with curl, the openai SDK, tritonclient and `loraship ui` (the key is read, never printed)."""
    return "\n".join(
        [
            f"export LORASHIP_API_KEY=$({key_command})",
            f"curl -s {endpoint}/v1/chat/completions -H \"Authorization: Bearer $LORASHIP_API_KEY\" -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'",
            f"python -c \"import os, openai; c = openai.OpenAI(base_url='{endpoint}/v1', api_key=os.environ['LORASHIP_API_KEY']); "
            f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hello'}}], max_tokens=32).choices[0].message.content)\"",
            sample_curl(endpoint, model, header),
            "python -c \"import os, tritonclient.http as h; c = h.InferenceServerClient('"
            + endpoint.removeprefix("https://")
            + f"', ssl=True); print(c.is_model_ready('{model}', headers={{'{header}': os.environ['LORASHIP_API_KEY']}}))\"",
            f"loraship generate --url {endpoint} --api-key $LORASHIP_API_KEY \"Hello\"",
            f"loraship ui --url {endpoint} --api-key $LORASHIP_API_KEY",
        ]
    )
