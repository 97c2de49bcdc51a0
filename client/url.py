"""The one rule for endpoint URLs: the scheme picks the protocol; a bare ``HOST:PORT`` means gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from loraship.client.errors import EndpointError

PROTOCOLS = ("http", "grpc")

#: URL scheme -> (protocol, TLS). A URL without a scheme (``HOST:PORT``) means gRPC.
SCHEMES: dict[str, tuple[str, bool]] = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}

#: Where a client without a URL looks: a local Triton's default ports.
DEFAULT_URLS = {"http": "http://127.0.0.1:8000", "grpc": "127.0.0.1:8001"}

#: The rule, as help texts state it.
URL_HELP = "http:// or https:// for HTTP; grpc://, grpcs:// or a bare HOST:PORT for gRPC"


@dataclass(frozen=True)
class Endpoint:
    """Where a `Client` connects and in which protocol: ``url`` is its canonical form."""

    protocol: str
    ssl: bool
    host: str
    port: int
    base_path: str

    @property
    def url(self) -> str:
        if self.protocol == "grpc":
            return f"{self.host}:{self.port}"
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}{self.base_path}"


def parse_endpoint(url: str | None, protocol: str | None = None) -> Endpoint:
    """The one rule for endpoint URLs: the scheme picks the protocol (`SCHEMES`); a URL without one
    (``HOST:PORT``) uses ``protocol`` when given, else gRPC. No URL: the local default of ``protocol``
    (HTTP when that is not given either). A protocol that contradicts the scheme is refused."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise EndpointError(f"unknown protocol {protocol!r}", "use http or grpc")
    if url is None:
        url = DEFAULT_URLS[protocol or "http"]
    scheme = url.split("://", 1)[0].lower() if "://" in url else None
    if scheme is not None and scheme not in SCHEMES:
        raise EndpointError(f"unknown URL scheme {scheme + '://'!r} in {url!r}", f"use {URL_HELP}")
    implied, ssl = SCHEMES[scheme] if scheme else (protocol or "grpc", False)
    if protocol is not None and protocol != implied:
        raise EndpointError(f"{url} is a{'n HTTP' if implied == 'http' else ' gRPC'} URL but the protocol is {protocol}",
                            "drop --protocol: the URL's scheme picks it")
    parts = urlsplit(url if scheme else f"//{url}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number from 0 to 65535
        host = port = None
    if not host:
        raise EndpointError(f"cannot parse endpoint URL {url!r}", "use e.g. http://127.0.0.1:8000 for HTTP or 127.0.0.1:8001 for gRPC")
    default_port = 443 if ssl else (80 if implied == "http" else 8001)
    return Endpoint(implied, ssl, host, port or default_port, parts.path.rstrip("/"))
