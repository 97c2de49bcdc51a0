"""Fixtures: loopback HTTPS fakes that stand in for Azure, and real Azure SDK clients pointed at them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import trustme
from azure.core.credentials import AccessToken

from loraship.infra.clients import Settings
from loraship.infra.params import PACKAGED_PARAMS, load_params

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside the tests (importlib import mode)

from azure_fakes.arm import SUB, TOKEN, FakeArm  # noqa: E402
from azure_fakes.files import FakeFiles  # noqa: E402
from azure_fakes.helpers import RG  # noqa: E402

class FakeCredential:
    """A TokenCredential handing out the token the ARM fake accepts."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(TOKEN, int(time.time()) + 3600)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_path(ca, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def files(ca):
    fake = FakeFiles(ca)
    yield fake
    fake.close()


@pytest.fixture
def arm(ca, files):
    fake = FakeArm(ca, files)
    fake.add_group(RG)
    yield fake
    fake.close()


@pytest.fixture
def settings(arm, files, ca_path) -> Settings:
    """Real SDK clients aimed at the fakes: no retries, no LRO waits."""
    return Settings(
        subscription_id=SUB,
        arm_endpoint=arm.url,
        files_endpoint=files.endpoint,
        credential=FakeCredential(),
        client_kwargs={"connection_verify": ca_path, "retry_total": 0, "polling_interval": 0},
    )


@pytest.fixture
def params(files):
    """The shipped parameters file, with the fake's storage account name."""
    p = load_params(PACKAGED_PARAMS)
    p.storageAccountName = files.account
    return p


@pytest.fixture
def cli(settings, monkeypatch, tmp_path, capsys, files, ca_path):
    """Run `loraship ...` in-process through the real entry point (its one-line error boundary).

    The only seam: Settings.from_env returns the fakes' settings (endpoints and credential)."""
    from loraship.cli import main as cli_main

    monkeypatch.setattr(Settings, "from_env", classmethod(lambda cls, sub: settings))
    monkeypatch.setenv("SSL_CERT_FILE", ca_path)  # the real loraship Client (tritonclient) trusts the fake's CA
    monkeypatch.setenv("COLUMNS", "250")  # rich tables unwrapped
    params_path = tmp_path / "inference.parameters.json"
    params_path.write_text(PACKAGED_PARAMS.read_text().replace('"lorashipmodels"', f'"{files.account}"'))
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            cli_main.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    run.params_path = params_path
    return run
