"""What a StagedTraining may ask of the cluster: images from the operator's allow-list, and a
RayCluster template no wider than the pods the operator builds itself.

Whoever may create a StagedTraining gets pods run in the operator's namespace. Unchecked, a spec
could name any image and any pod spec: host namespaces, privileged containers, hostPath, the
namespace's Secrets as volumes or environment, another service account. `plan_admission` is a
pure function of the spec and the allow-list and returns every refusal, each naming the field,
the reason and the fix; the operator creates nothing for a refused spec. What is not refused is
filled in by `build_enforced_cluster` (operators/rayjob.py): token auth, PSS restricted security
contexts, no API token, limits, bounded emptyDirs. The CRD's CEL rules (operators/resource.py)
refuse the plainest cases at the API server already; this is the check that covers them all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from operators.rayjob import RAY_HEAD_PORTS, RAY_UID, build_ray_start_params, worker_pods
from operators.resource import MAX_REPLICAS, StagedTrainingSpec

TEMPLATE = "spec.ray_cluster.template"
# RayCluster fields a template may set: what the operator can check. Anything else (autoscaler
# options, its own NetworkPolicy rules, GCS fault tolerance with a Redis password Secret, ...)
# is refused until someone reviews what it grants.
TEMPLATE_FIELDS = ("rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "suspend")
SAFE_VOLUMES = ("persistentVolumeClaim", "configMap", "emptyDir", "ephemeral", "downwardAPI")
VOLUME_REASONS = {
    "hostPath": "mounts a directory of the node",
    "secret": "mounts a Secret, which whoever writes the StagedTraining may not be allowed to read",
    "projected": "can carry service-account tokens and Secrets",
    "csi": "an inline CSI volume can mount Secrets (secrets-store driver) or node storage",
}
# Labels the NetworkPolicy (manifests/base/network/) lets reach the dashboard: a template may
# not claim them (its ringpilot.io/ray label is overwritten with the pod's role).
TRUSTED_LABELS = {"app.kubernetes.io/name": "ringpilot-operator",
                  "app.kubernetes.io/component": "kuberay-operator"}
SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
# Every Ray port a template might move; the NetworkPolicy only admits the pinned ones.
PINNED_PORTS = {"port": str(RAY_HEAD_PORTS["gcs-server"]),
                "dashboard-port": str(RAY_HEAD_PORTS["dashboard"]),
                "ray-client-server-port": str(RAY_HEAD_PORTS["client"]),
                **build_ray_start_params()}
_IMAGE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*(?::\d+(?=/))?(?:/[a-z0-9][a-z0-9._-]*)*)"
                    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
                    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?\Z")


@dataclass(frozen=True)
class Refusal:
    """One thing the operator will not run, as the user reads it."""
    field: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}. Fix: {self.fix}."


@dataclass(frozen=True)
class ImageRef:
    name: str
    tag: str | None
    digest: str | None


def parse_image(text: str) -> ImageRef:
    """NAME[:TAG][@sha256:DIGEST], the name compared as written (no docker.io/library/ added)."""
    m = _IMAGE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an image reference (NAME:TAG or NAME@sha256:DIGEST)")
    return ImageRef(m["name"], m["tag"], m["digest"])


def parse_allowed_images(text: str) -> tuple[str, ...]:
    """The allow-list from its configuration text: image references, comma or space separated."""
    images = tuple(t for t in re.split(r"[,\s]+", text) if t)
    if not images:
        raise ValueError("the image allow-list is empty; give at least the operator's own image")
    for image in images:
        try:
            parse_image(image)
        except ValueError as e:
            raise ValueError(f"image allow-list entry {e}") from None
    return images


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """An entry with a digest admits that digest only; one without, that exact tag, undigested
    (a tag entry admitting `NAME:TAG@sha256:...` would admit any content of the repository)."""
    try:
        ref = parse_image(image)
    except ValueError:
        return False
    for entry in map(parse_image, allowed):
        if entry.name != ref.name:
            continue
        if entry.digest is not None:
            if ref.digest == entry.digest:
                return True
        elif ref.digest is None and (ref.tag or "latest") == (entry.tag or "latest"):
            return True
    return False


def plan_admission(spec: StagedTrainingSpec, allowed_images: Sequence[str]) -> list[Refusal]:
    """Every reason not to run `spec` on this operator; empty when it may run."""
    found = []
    if not image_allowed(spec.image, allowed_images):
        found.append(_image_refusal("spec.image", spec.image, allowed_images))
    pods = worker_pods(spec)
    if spec.ray_cluster.template is None and spec.ray_cluster.selector is None \
            and pods > MAX_REPLICAS:
        found.append(Refusal("spec.resources.workers", f"{spec.resources.workers} workers need "
                             f"{pods} worker pods, more than the {MAX_REPLICAS} the operator "
                             "builds a cluster with", "give fewer workers (or more "
                             "ray_cluster.gpus_per_node)"))
    if spec.ray_cluster.template is not None:
        found += _plan_template(spec.ray_cluster.template, allowed_images)
    return found


AUTH_SECRET_SUFFIX = "-ray-token"


def plan_auth_secret(name: str, spec: StagedTrainingSpec) -> list[Refusal]:
    """ray_cluster.auth_secret must be the run's own: `<name>-ray-token`.

    The token Secret is mounted into the run's Ray pods, where the tenant's code reads it; any
    other name could hand the run another run's token. A label on the Secret would say the same
    only if the operator could read Secrets, which its Role deliberately does not grant; a name
    is checked without reading anything (StagedTraining names are unique in the namespace)."""
    secret = spec.ray_cluster.auth_secret
    own = f"{name}{AUTH_SECRET_SUFFIX}"
    if secret is None or secret == own:
        return []
    return [Refusal("spec.ray_cluster.auth_secret", f"{secret!r} is not this run's token "
                    f"Secret; a run may only use a Secret named {own!r}", f"create the token "
                    f"Secret as {own} (key auth_token), or remove auth_secret (KubeRay then "
                    "generates one)")]


def _image_refusal(field: str, image: Any, allowed: Sequence[str]) -> Refusal:
    return Refusal(field, f"{image!r} is not on the operator's image allow-list "
                   f"({', '.join(allowed)})", "use an image from that list, or have the cluster "
                   "admin add this one to RINGPILOT_ALLOWED_IMAGES on the operator Deployment")


def _plan_template(template: dict[str, Any], allowed: Sequence[str]) -> list[Refusal]:
    found = [Refusal(f"{TEMPLATE}.{_seg(key)}", "is not a RayCluster field the operator can check "
                     f"(it accepts {', '.join(TEMPLATE_FIELDS)})", "remove it")
             for key in template if key not in TEMPLATE_FIELDS]
    if template.get("enableInTreeAutoscaling"):
        found.append(Refusal(f"{TEMPLATE}.enableInTreeAutoscaling", "the autoscaler needs a "
                             "Kubernetes API token in the Ray head, and the operator sizes each "
                             "stage's cluster itself", "remove it"))
    found += _plan_auth(template.get("authOptions"))
    head = template.get("headGroupSpec")
    if not isinstance(head, dict):
        found.append(Refusal(f"{TEMPLATE}.headGroupSpec", "is missing", "give the head's group "
                             "(headGroupSpec.template.spec.containers)"))
    else:
        where = f"{TEMPLATE}.headGroupSpec"
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            key = "enableIngress" if head.get("enableIngress") else "serviceType"
            found.append(Refusal(f"{where}.{key}", "would expose the Ray dashboard and GCS "
                                 "outside the cluster", "remove it (the head stays ClusterIP)"))
        if "headService" in head:
            found.append(Refusal(f"{where}.headService", "is a Service the operator cannot "
                                 "check", "remove it"))
        found += _plan_group(head, where, allowed)
    groups = template.get("workerGroupSpecs") or []
    if not isinstance(groups, list):
        return [*found, Refusal(f"{TEMPLATE}.workerGroupSpecs", "is not a list",
                                "give a list of worker groups")]
    for i, group in enumerate(groups):
        where = f"{TEMPLATE}.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            found.append(Refusal(where, "is not a worker group", "give groupName, replicas and "
                                 "template"))
            continue
        found += _plan_group(group, where, allowed)
    return found


def _plan_auth(auth: Any) -> list[Refusal]:
    where = f"{TEMPLATE}.authOptions"
    if auth is None:
        return []
    if not isinstance(auth, dict):
        return [Refusal(where, "is not an object", "remove it (the operator sets mode: token)")]
    found = []
    if auth.get("mode", "token") != "token":
        found.append(Refusal(f"{where}.mode", f"{auth['mode']!r} would turn Ray's token "
                             "authentication off; it is always on", "remove authOptions (the "
                             "operator sets mode: token)"))
    if "secretName" in auth:
        found.append(Refusal(f"{where}.secretName", "the token Secret is the operator's to "
                             "name", "name it in spec.ray_cluster.auth_secret instead"))
    if auth.get("enableK8sTokenAuth"):
        found.append(Refusal(f"{where}.enableK8sTokenAuth", "needs a Kubernetes API token in "
                             "every Ray pod", "remove it"))
    for key in sorted(set(auth) - {"mode", "secretName", "enableK8sTokenAuth"}):
        found.append(Refusal(f"{where}.{_seg(key)}", "is not an auth option the operator can check",
                             "remove it"))
    return found


# The allow-list of a group's pod template. A field not named here is refused with its path: a
# new Kubernetes field grants nothing until someone reviews it. Each value is then checked for
# its type, so any JSON gets a verdict, never an exception.
GROUP_FIELDS = ("groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                "rayStartParams", "template", "serviceType", "enableIngress", "headService",
                "idleTimeoutSeconds", "suspend")
POD_META_FIELDS = ("labels", "annotations")
POD_FIELDS = ("containers", "initContainers", "volumes", "securityContext", "nodeSelector",
              "affinity", "tolerations", "imagePullSecrets", "restartPolicy",
              "terminationGracePeriodSeconds", "enableServiceLinks",
              "automountServiceAccountToken", "serviceAccountName", "serviceAccount",
              "hostNetwork", "hostPID", "hostIPC")
CONTAINER_FIELDS = ("name", "image", "imagePullPolicy", "command", "args", "workingDir", "env",
                    "envFrom", "resources", "volumeMounts", "ports", "securityContext",
                    "livenessProbe", "readinessProbe", "startupProbe", "lifecycle",
                    "terminationMessagePolicy")
PORT_FIELDS = ("containerPort", "name", "protocol")
MOUNT_FIELDS = ("name", "mountPath", "readOnly", "subPath")
ENV_FIELDS = ("name", "value", "valueFrom")
ENV_SOURCES = ("fieldRef", "resourceFieldRef", "configMapKeyRef")
RESOURCE_FIELDS = ("limits", "requests")
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
POD_SECURITY_FIELDS = ("runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "supplementalGroups",
                       "fsGroupChangePolicy", "seccompProfile", "appArmorProfile",
                       "seLinuxOptions")
CONTAINER_SECURITY_FIELDS = ("runAsNonRoot", "runAsUser", "runAsGroup", "allowPrivilegeEscalation",
                             "capabilities", "readOnlyRootFilesystem", "seccompProfile",
                             "appArmorProfile", "seLinuxOptions", "privileged")
# Why some fields off the allow-list are refused, for a message better than "not allowed".
FIELD_REASONS = {
    "nodeName": "places the pod on a node of its choosing, past the scheduler",
    "priorityClassName": "could preempt other tenants' pods",
    "priority": "could preempt other tenants' pods",
    "runtimeClassName": "picks the container runtime (and its isolation)",
    "hostAliases": "rewrites /etc/hosts, e.g. to redirect the operator's or Ray's addresses",
    "resourceClaims": "claims devices through DRA outside the run's resources",
    "claims": "claims devices through DRA outside the run's resources",
    "ephemeralContainers": "are for debugging a running pod",
    "shareProcessNamespace": "lets one container see and signal the others' processes",
    "schedulerName": "bypasses the cluster's scheduler",
    "hostUsers": "turns user namespaces off",
    "sysctls": "sets kernel parameters",
    "windowsOptions": "can run the container on the host (hostProcess)",
    "procMount": "unmasks /proc",
    "mountPropagation": "propagates mounts between the node and the container",
    "subPathExpr": "builds a mount path from the environment",
    "hostPort": "binds a port of the node",
    "hostIP": "binds an address of the node",
    "secretKeyRef": "reads a Secret, which whoever writes the StagedTraining may not be allowed "
                    "to read",
    "secretRef": "reads a Secret into the environment",
    "overhead": "is set by the RuntimeClass, not the pod",
}


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,253}\Z")


def _seg(key: Any) -> str:
    """A key written by the user, as a path segment: quoted when it is not a plain name, so a
    key cannot break the message (newlines) or pose as another path."""
    return key if isinstance(key, str) and _PLAIN_KEY.match(key) else _short(key)


def _refuse_extra(node: dict[str, Any], allowed: Sequence[str], where: str) -> list[Refusal]:
    return [Refusal(f"{where}.{_seg(key)}", FIELD_REASONS.get(key, "is not a field the operator "
                                                         "allows here"),
                    f"remove it (allowed: {', '.join(allowed)})")
            for key in node if key not in allowed]


def _typed(value: Any, kind: type | tuple[type, ...], where: str, what: str
           ) -> tuple[Any, list[Refusal]]:
    """`value` if it is a `kind` (None too: absent); else a refusal saying what it should be."""
    if value is None or (isinstance(value, kind) and not (
            kind in (int, float, (int, float)) and isinstance(value, bool))):
        return value, []
    return None, [Refusal(where, f"is {_kind_of(value)}, not {what}", f"give {what}")]


def _kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({_short(value)})"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _objects(value: Any, where: str, what: str) -> tuple[list[tuple[str, dict]], list[Refusal]]:
    """The entries of a list of objects, each with its path; refusals for the rest."""
    items, found = _typed(value, list, where, f"a list of {what}")
    out = []
    for i, item in enumerate(items or []):
        if isinstance(item, dict):
            out.append((f"{where}[{i}]", item))
        else:
            found.append(Refusal(f"{where}[{i}]", f"is {_kind_of(item)}, not {what}",
                                 f"give {what}"))
    return out, found


def _strings(node: dict[str, Any], keys: Sequence[str], where: str) -> list[Refusal]:
    return [r for k in keys for r in _typed(node.get(k), str, f"{where}.{k}", "a string")[1]]


def _plan_group(group: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = _refuse_extra(group, GROUP_FIELDS, where)
    for key in ("replicas", "minReplicas", "maxReplicas", "numOfHosts"):
        value, bad = _typed(group.get(key), int, f"{where}.{key}", "a whole number")
        found += bad
        if value is not None and not 0 <= value <= MAX_REPLICAS:
            found.append(Refusal(f"{where}.{key}", f"{value} is outside 0..{MAX_REPLICAS}",
                                 "give a count the cluster can hold"))
    params, bad = _typed(group.get("rayStartParams"), dict, f"{where}.rayStartParams",
                         "an object of strings")
    found += bad
    for key, port in PINNED_PORTS.items():
        if params and key in params and str(params[key]) != port:
            found.append(Refusal(f"{where}.rayStartParams.{key}", f"the NetworkPolicy admits "
                                 f"Ray's pinned port {port} only", "remove it"))
    pod, bad = _typed(group.get("template"), dict, f"{where}.template", "a pod template")
    found += bad
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        return [*found, Refusal(f"{where}.template.spec", "is missing", "give the pod spec "
                                "(containers with an image from the allow-list)")]
    found += _refuse_extra(pod, ("metadata", "spec"), f"{where}.template")
    meta, bad = _typed(pod.get("metadata"), dict, f"{where}.template.metadata", "an object")
    found += bad
    if meta:
        found += _refuse_extra(meta, POD_META_FIELDS, f"{where}.template.metadata")
        for key in POD_META_FIELDS:
            found += _plan_string_map(meta.get(key), f"{where}.template.metadata.{key}")
        labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
        for key, value in sorted(labels.items()):
            if TRUSTED_LABELS.get(key) == value:
                found.append(Refusal(f"{where}.template.metadata.labels.{_seg(key)}",
                                     f"{value!r} is a label the operator's NetworkPolicy trusts",
                                     "remove it"))
    return found + _plan_pod(pod["spec"], f"{where}.template.spec", allowed)


def _plan_string_map(value: Any, where: str) -> list[Refusal]:
    node, found = _typed(value, dict, where, "an object of strings")
    for key, item in (node or {}).items():
        found += _typed(item, str, f"{where}.{_seg(key)}", "a string")[1]
    return found


def _plan_pod(pod: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = _refuse_extra(pod, POD_FIELDS, where)
    for key, what in (("hostNetwork", "network"), ("hostPID", "process"), ("hostIPC", "IPC")):
        if pod.get(key) not in (None, False):
            found.append(Refusal(f"{where}.{key}", f"would share the node's {what} namespace "
                                 "with the run", "remove it"))
    if pod.get("automountServiceAccountToken") not in (None, False):
        found.append(Refusal(f"{where}.automountServiceAccountToken", "would mount a Kubernetes "
                             "API token into Ray pods that need none", "remove it (the operator "
                             "sets false)"))
    for key in ("serviceAccountName", "serviceAccount"):
        if pod.get(key) not in (None, "", "default"):
            found.append(Refusal(f"{where}.{key}", f"would run the Ray pods as "
                                 f"{_short(pod[key])}, with its API and cloud permissions",
                                 "remove it (Ray pods run as the namespace's default account, "
                                 "without a token)"))
    found += _typed(pod.get("restartPolicy"), str, f"{where}.restartPolicy", "a string")[1]
    found += _typed(pod.get("terminationGracePeriodSeconds"), int,
                    f"{where}.terminationGracePeriodSeconds", "a whole number")[1]
    found += _typed(pod.get("enableServiceLinks"), bool, f"{where}.enableServiceLinks",
                    "a boolean")[1]
    found += _plan_string_map(pod.get("nodeSelector"), f"{where}.nodeSelector")
    found += _typed(pod.get("affinity"), dict, f"{where}.affinity", "an object")[1]
    secrets, bad = _objects(pod.get("imagePullSecrets"), f"{where}.imagePullSecrets",
                            "{name: SECRET}")
    found += bad
    for path, ref in secrets:
        found += _refuse_extra(ref, ("name",), path) + _strings(ref, ("name",), path)
    found += _plan_tolerations(pod.get("tolerations"), f"{where}.tolerations")
    found += _plan_security(pod.get("securityContext"), f"{where}.securityContext", pod=True)
    volumes, bad = _objects(pod.get("volumes"), f"{where}.volumes", "a volume")
    found += bad
    for path, volume in volumes:
        found += _plan_volume(volume, path)
    containers, bad = _objects(pod.get("containers"), f"{where}.containers", "a container")
    found += bad
    if not containers and not bad:
        found.append(Refusal(f"{where}.containers", "is missing", "give the Ray container"))
    inits, bad = _objects(pod.get("initContainers"), f"{where}.initContainers", "a container")
    found += bad
    for path, c in [*inits, *containers]:
        found += _plan_container(c, path, allowed)
    return found


def _plan_tolerations(value: Any, where: str) -> list[Refusal]:
    tolerations, found = _objects(value, where, "a toleration")
    for path, t in tolerations:
        found += _refuse_extra(t, TOLERATION_FIELDS, path)
        found += _strings(t, ("key", "operator", "value", "effect"), path)
        found += _typed(t.get("tolerationSeconds"), int, f"{path}.tolerationSeconds",
                        "a whole number")[1]
        if not t.get("key"):
            found.append(Refusal(f"{path}.key", "is empty, so the toleration tolerates every "
                                 "taint (control-plane, NoExecute, other tenants' nodes)",
                                 "name the taint's key (e.g. nvidia.com/gpu)"))
    return found


def _plan_volume(volume: dict[str, Any], where: str) -> list[Refusal]:
    found = _strings(volume, ("name",), where)
    kinds = [k for k in volume if k != "name"]
    if len(kinds) != 1:
        named = ", ".join(map(_seg, kinds)) or "none"
        return [*found, Refusal(where, f"has {len(kinds)} sources ({named}); a volume has "
                                "exactly one", f"keep one of "
                                f"{', '.join(SAFE_VOLUMES)}")]
    kind = kinds[0]
    if kind not in SAFE_VOLUMES:
        return [*found, Refusal(f"{where}.{_seg(kind)}", VOLUME_REASONS.get(
            kind, "is not a volume type the operator allows"), f"use {', '.join(SAFE_VOLUMES)} "
            "volumes")]
    return found + _typed(volume[kind], dict, f"{where}.{kind}", "an object")[1]


def _plan_container(c: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = _refuse_extra(c, CONTAINER_FIELDS, where)
    found += _strings(c, ("name", "imagePullPolicy", "workingDir", "terminationMessagePolicy"),
                      where)
    for key in ("command", "args"):
        items, bad = _typed(c.get(key), list, f"{where}.{key}", "a list of strings")
        found += bad
        for i, item in enumerate(items or []):
            found += _typed(item, str, f"{where}.{key}[{i}]", "a string")[1]
    for key in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
        found += _typed(c.get(key), dict, f"{where}.{key}", "an object")[1]
    image = c.get("image")
    if not image:
        found.append(Refusal(f"{where}.image", "is missing", "set it to spec.image"))
    elif not isinstance(image, str) or not image_allowed(image, allowed):
        found.append(_image_refusal(f"{where}.image", image, allowed))
    found += _plan_security(c.get("securityContext"), f"{where}.securityContext", pod=False)
    ports, bad = _objects(c.get("ports"), f"{where}.ports", "a port ({containerPort: N})")
    found += bad
    for path, port in ports:
        found += _refuse_extra(port, PORT_FIELDS, path) + _strings(port, ("name",), path)
        number, bad = _typed(port.get("containerPort"), int, f"{path}.containerPort",
                             "a port number")
        found += bad
        if number is None and not bad:
            found.append(Refusal(f"{path}.containerPort", "is missing", "give the port number"))
        elif number is not None and not 1 <= number <= 65535:
            found.append(Refusal(f"{path}.containerPort", f"{number} is not a port",
                                 "give 1..65535"))
        if port.get("protocol") not in (None, "TCP", "UDP", "SCTP"):
            found.append(Refusal(f"{path}.protocol", f"{_short(port['protocol'])} is not a "
                                 "protocol", "give TCP, UDP or SCTP"))
    found += _plan_env(c, where)
    mounts, bad = _objects(c.get("volumeMounts"), f"{where}.volumeMounts", "a volume mount")
    found += bad
    for path, mount in mounts:
        found += _refuse_extra(mount, MOUNT_FIELDS, path)
        found += _strings(mount, ("name", "mountPath", "subPath"), path)
        found += _typed(mount.get("readOnly"), bool, f"{path}.readOnly", "a boolean")[1]
        sub = mount.get("subPath")
        if isinstance(sub, str) and (sub.startswith("/") or ".." in sub.split("/")):
            found.append(Refusal(f"{path}.subPath", "leaves its volume", "give a relative path "
                                 "inside the volume, without '..'"))
    return found + _plan_resources(c.get("resources"), f"{where}.resources")


def _plan_env(c: dict[str, Any], where: str) -> list[Refusal]:
    entries, found = _objects(c.get("env"), f"{where}.env", "{name: N, value: V}")
    for path, env in entries:
        found += _refuse_extra(env, ENV_FIELDS, path) + _strings(env, ("name", "value"), path)
        source, bad = _typed(env.get("valueFrom"), dict, f"{path}.valueFrom", "an object")
        found += bad
        if source:
            found += _secret_ref(source, "secretKeyRef", f"{path}.valueFrom")
            found += _refuse_extra({k: v for k, v in source.items() if k != "secretKeyRef"},
                                   ENV_SOURCES, f"{path}.valueFrom")
            for key in ENV_SOURCES:
                found += _typed(source.get(key), dict, f"{path}.valueFrom.{key}",
                                "an object")[1]
    sources, bad = _objects(c.get("envFrom"), f"{where}.envFrom", "{configMapRef: {name: N}}")
    found += bad
    for path, source in sources:
        found += _secret_ref(source, "secretRef", path)
        found += _refuse_extra({k: v for k, v in source.items() if k != "secretRef"},
                               ("configMapRef", "prefix"), path)
        found += _strings(source, ("prefix",), path)
        found += _typed(source.get("configMapRef"), dict, f"{path}.configMapRef",
                        "an object")[1]
    return found


def _secret_ref(node: dict[str, Any], key: str, where: str) -> list[Refusal]:
    if key not in node:
        return []
    ref = node[key]
    name = _short(ref.get("name")) if isinstance(ref, dict) else "(unnamed)"
    return [Refusal(f"{where}.{key}", f"reads Secret {name}, which whoever writes the "
                    "StagedTraining may not be allowed to read", "remove it (the Ray token is "
                    "added by KubeRay)")]


def _plan_resources(value: Any, where: str) -> list[Refusal]:
    resources, found = _typed(value, dict, where, "an object with limits and requests")
    resources = resources or {}
    found += _refuse_extra(resources, RESOURCE_FIELDS, where)
    given: set[str] = set()
    for key in RESOURCE_FIELDS:
        amounts, bad = _typed(resources.get(key), dict, f"{where}.{key}",
                              "an object of quantities")
        found += bad
        for name, amount in (amounts or {}).items():
            found += _typed(amount, (str, int, float), f"{where}.{key}.{_seg(name)}",
                            "a quantity (e.g. 4 or 16Gi)")[1]
        given |= set(amounts or {})
    for name in ("cpu", "memory"):
        if name not in given:
            found.append(Refusal(f"{where}.limits.{name}", f"is not set, so the container could "
                                 f"take its node's whole {name}", f"set resources.limits.{name} "
                                 "(or requests: the operator copies requests into limits)"))
    return found


def _plan_security(value: Any, where: str, *, pod: bool) -> list[Refusal]:
    """The Pod Security Standards `restricted` rules a template could break explicitly (what it
    leaves out is filled in by build_enforced_cluster)."""
    sc, found = _typed(value, dict, where, "an object")
    if not sc:
        return found
    fields = POD_SECURITY_FIELDS if pod else CONTAINER_SECURITY_FIELDS
    found += _refuse_extra(sc, fields, where)
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        number, bad = _typed(sc.get(key), int, f"{where}.{key}", "a whole number")
        found += bad
        if key == "runAsUser" and number == 0:
            found.append(Refusal(f"{where}.runAsUser", "0 is root", f"remove it or use another "
                                 f"UID (the image's ray user is {RAY_UID})"))
    if sc.get("runAsNonRoot") not in (None, True):
        found.append(Refusal(f"{where}.runAsNonRoot", "would allow root", "remove it"))
    for key in ("seccompProfile", "appArmorProfile", "seLinuxOptions"):
        found += _typed(sc.get(key), dict, f"{where}.{key}", "an object")[1]
    seccomp = sc.get("seccompProfile")
    seccomp = seccomp.get("type") if isinstance(seccomp, dict) else None
    if seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(Refusal(f"{where}.seccompProfile.type", f"{_short(seccomp)} turns syscall "
                             "filtering off", "remove it (RuntimeDefault is set)"))
    armor = sc.get("appArmorProfile")
    if isinstance(armor, dict) and armor.get("type") not in (None, "RuntimeDefault", "Localhost"):
        found.append(Refusal(f"{where}.appArmorProfile.type", f"{_short(armor.get('type'))} "
                             "turns AppArmor off", "remove it"))
    selinux = sc.get("seLinuxOptions")
    if isinstance(selinux, dict) and (selinux.get("user") or selinux.get("role") or
                                      selinux.get("type") not in (None, *SELINUX_TYPES)):
        found.append(Refusal(f"{where}.seLinuxOptions", "sets an SELinux user, role or type "
                             "beyond the container ones", "remove it"))
    if pod:
        return found
    if sc.get("privileged") not in (None, False):
        found.append(Refusal(f"{where}.privileged", "gives the container the node's devices and "
                             "every capability", "remove it"))
    if sc.get("allowPrivilegeEscalation") not in (None, False):
        found.append(Refusal(f"{where}.allowPrivilegeEscalation", "lets processes gain "
                             "privileges (setuid)", "remove it (the operator sets false)"))
    caps, bad = _typed(sc.get("capabilities"), dict, f"{where}.capabilities", "an object")
    found += bad
    if caps:
        found += _refuse_extra(caps, ("add", "drop"), f"{where}.capabilities")
        added = caps.get("add")
        if added:
            shown = ", ".join(map(str, added)) if isinstance(added, list) else _short(added)
            found.append(Refusal(f"{where}.capabilities.add", f"adds Linux capabilities "
                                 f"{shown}", "remove it (every capability is dropped)"))
    return found


def describe(refusals: Sequence[Refusal]) -> str:
    """One message for the status condition and the event."""
    return " ".join(str(r) for r in refusals)
