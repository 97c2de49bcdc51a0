"""A fake of Azure Resource Manager for the providers loraship uses.

Stands in for Azure: resource groups, Microsoft.Storage (accounts, file service,
shares, listKeys), Microsoft.OperationalInsights (workspaces, sharedKeys) and
Microsoft.App (managed environments, their storages, container apps, secrets,
revisions, replicas). It answers with Azure's status codes and long-running
operation headers: 202 + Location for storage account creation, 201 +
Azure-AsyncOperation for Microsoft.App PUTs, and checks the bearer token.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid

from .server import HttpsServer, Request, Response

TOKEN = "fake-arm-token"
SUB = "00000000-0000-0000-0000-00000000c0de"
WRITES = ("PUT", "PATCH", "DELETE")

RG_RE = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)(?P<rest>/providers/.*)?$", re.I)
OP_RE = re.compile(r"^/subscriptions/[^/]+/providers/(?P<ns>[^/]+)/locations/[^/]+/(?P<kind>[^/]+)/(?P<id>[^/]+)$", re.I)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return Response(status, body, {"Content-Type": "application/json", "x-ms-request-id": str(uuid.uuid4()), **(headers or {})})


def _json(status: int, data, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", "x-ms-request-id": str(uuid.uuid4()), **(headers or {})})


class FakeArm:
    """In-memory ARM; ``requests`` records every call for assertions."""

    def __init__(self, ca, files=None) -> None:
        self.files = files  # the FakeFiles whose shares ARM creates
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.groups: dict[str, dict] = {}
        self.resources: dict[str, dict] = {}  # lower-case id -> stored body (as Azure returns it)
        self.secrets: dict[str, list] = {}  # app id -> secrets with values
        self.storage_keys: dict[str, str] = {}  # env storage id -> account key received
        self.revisions: dict[str, list] = {}  # app id -> revisions
        self.ops: dict[str, int] = {}  # operation id -> polls left before success
        self.op_targets: dict[str, str] = {}
        self.taken_storage_names: set[str] = set()
        self.failures: list[tuple[str, str, int, str, str]] = []  # (method, path fragment, status, code, message)
        self.app_fqdn: str | None = None  # the ingress FQDN to report (tests point it at a fake Triton)
        self.server = HttpsServer(ca, self.handle)
        self.url = self.server.url

    # test helpers
    def fail(self, method: str, fragment: str, status: int, code: str, message: str) -> None:
        self.failures.append((method, fragment.lower(), status, code, message))

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in WRITES]

    def bodies(self, method: str, fragment: str) -> list[dict]:
        return [json.loads(r.body) for r in self.requests if r.method == method and fragment.lower() in r.path.lower()]

    def add_group(self, name: str, location: str = "westus3", tags: dict | None = None) -> None:
        rid = f"/subscriptions/{SUB}/resourceGroups/{name}"
        self.groups[name.lower()] = {"id": rid, "name": name, "location": location, "tags": tags or {}, "properties": {"provisioningState": "Succeeded"}}

    def get(self, rid_suffix: str) -> dict | None:
        for rid, body in self.resources.items():
            if rid.endswith(rid_suffix.lower()):
                return body
        return None

    def close(self) -> None:
        self.server.close()

    # dispatch
    def handle(self, req: Request) -> Response:
        with self.lock:
            self.requests.append(req)
            if req.headers.get("authorization") != f"Bearer {TOKEN}":
                return _error(401, "InvalidAuthenticationToken", "The access token is invalid.", {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/x"'})
            if "api-version" not in req.query:
                return _error(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required.")
            for method, fragment, status, code, message in self.failures:
                if method in (req.method, "*") and fragment in req.path.lower():
                    return _error(status, code, message)
            if m := OP_RE.match(req.path):
                return self._operation(req, m["ns"], m["id"])
            m = RG_RE.match(req.path)
            if not m or m["sub"] != SUB:
                return _error(404, "SubscriptionNotFound", f"The subscription '{req.path}' could not be found.")
            if not m["rest"]:
                return self._group(req, m["rg"])
            if m["rg"].lower() not in self.groups:
                return _error(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
            return self._resource(req, m["rg"], m["rest"])

    def _group(self, req: Request, name: str) -> Response:
        if req.method == "GET":
            group = self.groups.get(name.lower())
            return _json(200, group) if group else _error(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
        if req.method == "PUT":
            body = json.loads(req.body)
            existed = name.lower() in self.groups
            self.add_group(name, body["location"], body.get("tags"))
            return _json(200 if existed else 201, self.groups[name.lower()])
        return _error(405, "MethodNotAllowed", req.method)

    def _operation(self, req: Request, ns: str, op_id: str) -> Response:
        left = self.ops.get(op_id)
        if left is None:
            return _error(404, "OperationNotFound", op_id)
        if ns.lower() == "microsoft.storage":  # Location polling: 202 until done, then the resource
            if left > 0:
                self.ops[op_id] -= 1
                return Response(202, b"", {"Location": self._op_url("Microsoft.Storage", op_id), "Retry-After": "0"})
            return _json(200, self.resources[self.op_targets[op_id]])
        if left > 0:
            self.ops[op_id] -= 1
            return _json(200, {"id": op_id, "name": op_id, "status": "InProgress"}, {"Retry-After": "0"})
        return _json(200, {"id": op_id, "name": op_id, "status": "Succeeded"})


    def _op_url(self, ns: str, op_id: str) -> str:
        return f"{self.url}/subscriptions/{SUB}/providers/{ns}/locations/westus3/operationStatuses/{op_id}?api-version=2025-01-01"

    def _new_op(self, ns: str, target: str) -> str:
        op_id = uuid.uuid4().hex
        self.ops[op_id] = 1  # one InProgress poll, then success
        self.op_targets[op_id] = target
        return self._op_url(ns, op_id)

    def _resource(self, req: Request, rg: str, rest: str) -> Response:
        rid = f"/subscriptions/{SUB}/resourceGroups/{rg}{rest}"
        key = rid.lower()
        parts = rest.strip("/").split("/")  # providers, ns, type, name, [child...]
        ns, kind = parts[1].lower(), "/".join(p.lower() for p in parts[2::2])
        action = parts[-1].lower() if req.method == "POST" else None
        if action:
            return self._action(req, ns, kind, rid.rsplit("/", 1)[0].lower(), action)
        stored = self.resources.get(key)
        if req.method == "GET":
            if kind.endswith("revisions") and len(parts) % 2 == 1:
                return self._list_revisions(rid)
            if kind.endswith("replicas") and len(parts) % 2 == 1:
                return self._list_replicas(rid)
            if stored is None:
                return _error(404, "ResourceNotFound", f"The Resource '{'/'.join(parts[1:])}' under resource group '{rg}' was not found.")
            return _json(200, stored)
        if req.method == "DELETE":
            if stored is None:
                return Response(204)
            for child in [k for k in self.resources if k.startswith(key + "/")]:
                del self.resources[child]
            del self.resources[key]
            if ns == "microsoft.app":
                return Response(202, b"", {"Azure-AsyncOperation": self._new_op("Microsoft.App", key), "Location": self._new_op("Microsoft.App", key), "Retry-After": "0"})
            return Response(200)
        if req.method != "PUT":
            return _error(405, "MethodNotAllowed", req.method)
        body = json.loads(req.body)
        name = parts[-1]
        if kind == "storageaccounts":
            if name in self.taken_storage_names:
                return _error(409, "StorageAccountAlreadyTaken", f"The storage account named {name} is already taken.")
            body["properties"] = {**body.get("properties", {}), "provisioningState": "Succeeded", "primaryEndpoints": {"file": f"https://{name}.file.core.windows.net/"}}
            self._store(key, rid, name, "Microsoft.Storage/storageAccounts", body)
            return Response(202, b"", {"Location": self._new_op("Microsoft.Storage", key), "Retry-After": "0"})
        if kind == "storageaccounts/fileservices/shares":
            if self.files is not None:
                self.files.create_share(name)
            return _json(201 if stored is None else 200, self._store(key, rid, name, "Microsoft.Storage/storageAccounts/fileServices/shares", body))
        if kind == "storageaccounts/fileservices":
            return _json(200, self._store(key, rid, name, "Microsoft.Storage/storageAccounts/fileServices", body))
        if kind == "workspaces":
            body["properties"] = {**body.get("properties", {}), "provisioningState": "Succeeded", "customerId": str(uuid.uuid5(uuid.NAMESPACE_URL, key))}
            return _json(201 if stored is None else 200, self._store(key, rid, name, "Microsoft.OperationalInsights/workspaces", body))
        if kind == "managedenvironments":
            props = body.setdefault("properties", {})
            props.update(provisioningState="Succeeded", defaultDomain=f"{name}.westus3.azurecontainerapps.io")
            if props.get("appLogsConfiguration", {}).get("logAnalyticsConfiguration"):
                props["appLogsConfiguration"]["logAnalyticsConfiguration"]["sharedKey"] = None
            return self._async_put(key, rid, name, "Microsoft.App/managedEnvironments", body, stored)
        if kind == "managedenvironments/storages":
            azure_file = body["properties"]["azureFile"]
            self.storage_keys[key] = azure_file.pop("accountKey", None)
            return _json(200, self._store(key, rid, name, "Microsoft.App/managedEnvironments/storages", body))
        if kind == "containerapps":
            return self._put_app(key, rid, name, body, stored)
        return _error(400, "NoRegisteredProviderFound", f"fake does not implement {kind}")

    def _store(self, key: str, rid: str, name: str, rtype: str, body: dict) -> dict:
        body = copy.deepcopy(body)
        body.update(id=rid, name=name, type=rtype)
        self.resources[key] = body
        return body

    def _async_put(self, key, rid, name, rtype, body, stored) -> Response:
        stored_body = self._store(key, rid, name, rtype, body)
        return _json(201 if stored is None else 200, stored_body, {"Azure-AsyncOperation": self._new_op("Microsoft.App", key), "Retry-After": "0"})

    def _put_app(self, key, rid, name, body, stored) -> Response:
        props = body["properties"]
        self.secrets[key] = copy.deepcopy(props.get("configuration", {}).get("secrets", []))
        for secret in props.get("configuration", {}).get("secrets", []):
            secret.pop("value", None)  # GET never returns secret values
        revisions = self.revisions.setdefault(key, [])
        template = props.get("template", {})
        if not revisions or revisions[-1]["template"] != template:
            suffix = template.get("revisionSuffix") or uuid.uuid4().hex[:7]
            if any(r["name"] == f"{name}--{suffix}" for r in revisions):
                return _error(400, "ContainerAppRevisionSuffixExists", f"revision suffix {suffix} exists")
            revisions.append({"name": f"{name}--{suffix}", "template": copy.deepcopy(template)})
        latest = revisions[-1]["name"]
        fqdn = self.app_fqdn or f"{name}.example.westus3.azurecontainerapps.io"
        props.update(provisioningState="Succeeded", runningStatus="Running", latestRevisionName=latest, latestReadyRevisionName=latest, latestRevisionFqdn=fqdn)
        props.setdefault("configuration", {}).setdefault("ingress", {})["fqdn"] = fqdn
        return self._async_put(key, rid, name, "Microsoft.App/containerApps", body, stored)

    def _list_revisions(self, rid: str) -> Response:
        app = rid.rsplit("/", 1)[0].lower()
        items = [{"id": f"{app}/revisions/{r['name']}", "name": r["name"], "properties": {"active": i == len(self.revisions.get(app, [])) - 1, "healthState": "Healthy", "runningState": "Running", "replicas": 1, "template": r["template"]}} for i, r in enumerate(self.revisions.get(app, []))]
        return _json(200, {"value": items})

    def _list_replicas(self, rid: str) -> Response:
        rev = rid.rsplit("/", 1)[0]
        return _json(200, {"value": [{"id": f"{rev}/replicas/r1", "name": f"{rev.rsplit('/', 1)[1]}-r1", "properties": {"runningState": "Running", "containers": [{"name": "triton", "ready": True, "runningState": "Running"}]}}]})

    def _action(self, req: Request, ns: str, kind: str, target: str, action: str) -> Response:
        if target not in self.resources:
            return _error(404, "ResourceNotFound", f"{target} not found")
        if action == "listkeys":
            if self.files is None:
                return _error(500, "InternalError", "no files fake")
            return _json(200, {"keys": [{"keyName": "key1", "value": self.files.key, "permissions": "FULL"}]})
        if action == "sharedkeys":
            return _json(200, {"primarySharedKey": "ws-primary-key", "secondarySharedKey": "ws-secondary-key"})
        if action == "listsecrets":
            return _json(200, {"value": self.secrets.get(target, [])})
        return _error(400, "InvalidAction", action)
