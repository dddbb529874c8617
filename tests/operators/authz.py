"""The kube-apiserver's RBAC decision, emulated: request attributes from an HTTP request, the
rules a user is bound to from rendered manifests, and whether those rules allow the request.

Everything here is a pure function of its arguments, so the decisions are tested as tables
(tests/operators/test_rbac.py) and the KMock server (kmock_server.py) only wires them in. The
shapes follow k8s.io/apiserver (endpoints/request/requestinfo.go: RequestInfoFactory) and
k8s.io/kubernetes (plugin/pkg/auth/authorizer/rbac: RuleAllows, appliesTo).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Path segments with a meaning of their own (requestinfo.go).
SPECIAL_VERBS = {"proxy", "watch"}  # /api/v1/watch/namespaces/ns/pods: a deprecated watch
NAMESPACE_SUBRESOURCES = {"status", "finalize"}  # /api/v1/namespaces/ns/status is the namespace's
HTTP_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
              "DELETE": "delete"}
SUPERUSER_GROUP = "system:masters"  # the apiserver allows it everything before RBAC is asked

# What every cluster's bootstrap policy gives any authenticated user: API discovery and the
# health and version endpoints (ClusterRoles system:discovery and system:public-info-viewer).
BOOTSTRAP_POLICY: tuple[dict[str, Any], ...] = (
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "system:discovery"},
     "rules": [{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                                    "/openapi", "/openapi/*", "/readyz", "/version", "/version/"],
                "verbs": ["get"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "system:discovery"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                 "name": "system:discovery"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                   "name": "system:authenticated"}]},
)


@dataclass(frozen=True)
class Identity:
    """Who sends a request, as an authenticator would report it."""
    user: str
    groups: tuple[str, ...] = ()


ANONYMOUS = Identity("system:anonymous", ("system:unauthenticated",))


def service_account(namespace: str, name: str) -> Identity:
    """The identity a pod running as ServiceAccount `namespace/name` authenticates as."""
    return Identity(f"system:serviceaccount:{namespace}:{name}",
                    ("system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                     "system:authenticated"))


@dataclass(frozen=True)
class Attributes:
    """What RBAC decides on: one request's verb and target, and who sent it."""
    verb: str
    resource_request: bool = True
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""  # "" for cluster-scoped requests and for non-resource paths
    name: str = ""
    path: str = ""
    user: Identity = ANONYMOUS

    @property
    def target(self) -> str:
        """`resource/subresource` as RBAC rules spell it (`stagedtrainings/status`)."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def _truthy(values: Sequence[str]) -> bool:
    # Kubernetes' query-to-bool conversion: present and not "0"/"false" means true.
    return bool(values) and values[0] != "0" and values[0].lower() != "false"


def request_attributes(method: str, path: str, query: Mapping[str, Sequence[str]],
                       user: Identity | None = None) -> Attributes:
    """The attributes the apiserver derives from an HTTP method, URL path and query.

    `query` maps each parameter to its values (`urllib.parse.parse_qs` gives that shape).
    GET on a collection is `list` (`watch` with ?watch=true), on a named object `get`; DELETE
    on a collection is `deletecollection`; paths outside /api/v1 and /apis/G/V are
    non-resource requests whose verb is the lowercase HTTP method.
    """
    who = {"user": user} if user is not None else {}
    parts = [p for p in path.strip("/").split("/") if p]
    non_resource = Attributes(verb=method.lower(), resource_request=False, path=path, **who)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return non_resource
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix == "apis":
        if len(parts) < 3:  # /apis/G/V is discovery
            return non_resource
        group, parts = parts[0], parts[1:]
    parts = parts[1:]  # the version: RBAC rules do not name it
    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            raise ValueError(f"{method} {path}: no resource after /{parts[0]}/")
        verb, parts, by_method = parts[0], parts[1:], False
    else:
        verb, by_method = HTTP_VERBS.get(method.upper(), ""), True
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource = parts[0]
    name = parts[1] if len(parts) > 1 else ""
    subresource = parts[2] if len(parts) > 2 and verb != "proxy" else ""
    if by_method and verb == "get" and not name:
        verb = "watch" if _truthy(query.get("watch", [])) else "list"
        name = _exact_name(query.get("fieldSelector", []))
    if by_method and verb == "delete" and not name:
        verb = "deletecollection"
    return Attributes(verb=verb, api_group=group, resource=resource, subresource=subresource,
                      namespace=namespace, name=name, path=path, **who)


def _exact_name(selectors: Sequence[str]) -> str:
    """The name a list or watch is narrowed to by `fieldSelector=metadata.name=X`, if any."""
    for term in (selectors[0].split(",") if selectors else []):
        if "!=" in term:
            continue
        key, _, value = term.replace("==", "=").partition("=")
        if key.strip() == "metadata.name":
            return value.strip()
    return ""


@dataclass(frozen=True)
class Grant:
    """One policy rule and where it applies: a namespace (RoleBinding), or everywhere (None)."""
    rule: Mapping[str, Any]
    namespace: str | None
    source: str  # "RoleBinding ns/name -> Role name", for the messages


def _subject_matches(subject: Mapping[str, Any], who: Identity, binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return who.user == f"system:serviceaccount:{ns}:{subject['name']}"
    if kind == "User":
        return who.user == subject["name"]
    if kind == "Group":
        return subject["name"] in who.groups
    return False


def grants_for(docs: Iterable[Mapping[str, Any]], who: Identity) -> list[Grant]:
    """The rules bound to `who` by the RoleBindings and ClusterRoleBindings among `docs`.

    A RoleBinding's rules (from a Role in its namespace, or a ClusterRole) apply in that
    namespace only; a ClusterRoleBinding's apply everywhere. A binding whose role is missing
    grants nothing, as on a real cluster.
    """
    docs = list(docs)
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in docs if d.get("kind") in ("Role", "ClusterRole")}
    grants: list[Grant] = []
    for b in docs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ns = b["metadata"].get("namespace", "") if b["kind"] == "RoleBinding" else ""
        if not any(_subject_matches(s, who, ns) for s in b.get("subjects") or []):
            continue
        ref = b["roleRef"]
        role = roles.get((ref["kind"], ns if ref["kind"] == "Role" else "", ref["name"]))
        if role is None:
            continue
        where = ns if b["kind"] == "RoleBinding" else None
        source = f"{b['kind']} {ns + '/' if ns else ''}{b['metadata']['name']} -> " \
                 f"{ref['kind']} {ref['name']}"
        grants.extend(Grant(rule, where, source) for rule in role.get("rules") or [])
    return grants


def rule_allows(rule: Mapping[str, Any], a: Attributes) -> bool:
    """One PolicyRule against one request (rbac.RuleAllows)."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and a.verb not in verbs:
        return False
    if not a.resource_request:
        return any(u == "*" or u == a.path or (u.endswith("*") and a.path.startswith(u[:-1]))
                   for u in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and a.api_group not in groups:
        return False
    if not any(r == "*" or r == a.target or (a.subresource and r == f"*/{a.subresource}")
               for r in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


def authorize(grants: Sequence[Grant], a: Attributes) -> bool:
    """Whether `a` is allowed by any of the requester's `grants` (RBAC has no deny rules).

    A namespaced grant covers only requests in its namespace: never cluster-scoped requests or
    requests across all namespaces, which only a ClusterRoleBinding can allow.
    """
    if SUPERUSER_GROUP in a.user.groups:
        return True
    return any(rule_allows(g.rule, a) for g in grants
               if g.namespace is None or (a.resource_request and g.namespace == a.namespace))


def forbidden_status(a: Attributes) -> dict[str, Any]:
    """The Status body a real apiserver answers a denied request with (HTTP 403)."""
    q = json.dumps  # Go's %q, as the apiserver's messages quote
    if not a.resource_request:
        message = f"forbidden: User {q(a.user.user)} cannot {a.verb} path {q(a.path)}"
        details: dict[str, Any] = {}
    else:
        where = f"in the namespace {q(a.namespace)}" if a.namespace else "at the cluster scope"
        qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
        message = (f"{qualified}{' ' + q(a.name) if a.name else ''} is forbidden: User "
                   f"{q(a.user.user)} cannot {a.verb} resource {q(a.target)} in API group "
                   f"{q(a.api_group)} {where}")
        details = {"name": a.name, "group": a.api_group, "kind": a.resource}
    return status_body(403, "Forbidden", message, details)


def status_body(code: int, reason: str, message: str,
                details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A meta/v1 Status, the body of every API error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}
