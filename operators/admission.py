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

from operators.rayjob import RAY_HEAD_PORTS, RAY_UID, build_ray_start_params
from operators.resource import StagedTrainingSpec

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
                    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


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
    if spec.ray_cluster.template is not None:
        found += _plan_template(spec.ray_cluster.template, allowed_images)
    return found


def _image_refusal(field: str, image: Any, allowed: Sequence[str]) -> Refusal:
    return Refusal(field, f"{image!r} is not on the operator's image allow-list "
                   f"({', '.join(allowed)})", "use an image from that list, or have the cluster "
                   "admin add this one to RINGPILOT_ALLOWED_IMAGES on the operator Deployment")


def _plan_template(template: dict[str, Any], allowed: Sequence[str]) -> list[Refusal]:
    found = [Refusal(f"{TEMPLATE}.{key}", "is not a RayCluster field the operator can check "
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
        found.append(Refusal(f"{where}.{key}", "is not an auth option the operator can check",
                             "remove it"))
    return found


def _plan_group(group: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = []
    params = group.get("rayStartParams") or {}
    for key, port in PINNED_PORTS.items():
        if key in params and str(params[key]) != port:
            found.append(Refusal(f"{where}.rayStartParams.{key}", f"the NetworkPolicy admits "
                                 f"Ray's pinned port {port} only", "remove it"))
    pod = group.get("template")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        return [*found, Refusal(f"{where}.template.spec", "is missing", "give the pod spec "
                                "(containers with an image from the allow-list)")]
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for key, value in sorted(labels.items()):
        if TRUSTED_LABELS.get(key) == value:
            found.append(Refusal(f"{where}.template.metadata.labels.{key}", f"{value!r} is a "
                                 "label the operator's NetworkPolicy trusts", "remove it"))
    return found + _plan_pod(pod["spec"], f"{where}.template.spec", allowed)


def _plan_pod(pod: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = []
    for key, what in (("hostNetwork", "network"), ("hostPID", "process"), ("hostIPC", "IPC")):
        if pod.get(key):
            found.append(Refusal(f"{where}.{key}", f"would share the node's {what} namespace "
                                 "with the run", "remove it"))
    if pod.get("automountServiceAccountToken"):
        found.append(Refusal(f"{where}.automountServiceAccountToken", "would mount a Kubernetes "
                             "API token into Ray pods that need none", "remove it (the operator "
                             "sets false)"))
    for key in ("serviceAccountName", "serviceAccount"):
        if pod.get(key) not in (None, "", "default"):
            found.append(Refusal(f"{where}.{key}", f"would run the Ray pods as {pod[key]!r}, "
                                 "with its API and cloud permissions", "remove it (Ray pods run "
                                 "as the namespace's default account, without a token)"))
    if pod.get("ephemeralContainers"):
        found.append(Refusal(f"{where}.ephemeralContainers", "are for debugging a running pod",
                             "remove them"))
    found += _plan_security(pod.get("securityContext"), f"{where}.securityContext", pod=True)
    for i, volume in enumerate(pod.get("volumes") or []):
        kind = next((k for k in volume if k != "name"), None) if isinstance(volume, dict) else None
        if kind in SAFE_VOLUMES:
            continue
        found.append(Refusal(f"{where}.volumes[{i}].{kind}" if kind else f"{where}.volumes[{i}]",
                             VOLUME_REASONS.get(kind, "is not a volume type the operator allows"),
                             f"use {', '.join(SAFE_VOLUMES)} volumes"))
    containers = pod.get("containers")
    if not containers:
        found.append(Refusal(f"{where}.containers", "is missing", "give the Ray container"))
    for key in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(key) or []):
            found += _plan_container(c, f"{where}.{key}[{i}]", allowed)
    return found


def _plan_container(c: dict[str, Any], where: str, allowed: Sequence[str]) -> list[Refusal]:
    found = []
    image = c.get("image")
    if not image:
        found.append(Refusal(f"{where}.image", "is missing", "set it to spec.image"))
    elif not image_allowed(image, allowed):
        found.append(_image_refusal(f"{where}.image", image, allowed))
    found += _plan_security(c.get("securityContext"), f"{where}.securityContext", pod=False)
    for i, port in enumerate(c.get("ports") or []):
        if port.get("hostPort"):
            found.append(Refusal(f"{where}.ports[{i}].hostPort", "binds a port of the node",
                                 "remove it"))
    for i, env in enumerate(c.get("env") or []):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            found.append(Refusal(f"{where}.env[{i}].valueFrom.secretKeyRef", f"reads Secret "
                                 f"{ref.get('name')!r}, which whoever writes the StagedTraining "
                                 "may not be allowed to read", "remove it (the Ray token is "
                                 "added by KubeRay)"))
    for i, source in enumerate(c.get("envFrom") or []):
        if source.get("secretRef"):
            found.append(Refusal(f"{where}.envFrom[{i}].secretRef", f"reads Secret "
                                 f"{source['secretRef'].get('name')!r} into the environment",
                                 "remove it"))
    resources = c.get("resources") or {}
    given = set(resources.get("limits") or {}) | set(resources.get("requests") or {})
    for name in ("cpu", "memory"):
        if name not in given:
            found.append(Refusal(f"{where}.resources.limits.{name}", f"is not set, so the "
                                 f"container could take its node's whole {name}", f"set "
                                 f"resources.limits.{name} (or requests: the operator copies "
                                 "requests into limits)"))
    return found


def _plan_security(sc: Any, where: str, *, pod: bool) -> list[Refusal]:
    """The Pod Security Standards `restricted` rules a template could break explicitly (what it
    leaves out is filled in by build_enforced_cluster)."""
    if not sc:
        return []
    found = []
    if sc.get("runAsNonRoot") is False:
        found.append(Refusal(f"{where}.runAsNonRoot", "would allow root", "remove it"))
    if sc.get("runAsUser") == 0:
        found.append(Refusal(f"{where}.runAsUser", "0 is root", f"remove it or use another UID "
                             f"(the image's ray user is {RAY_UID})"))
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(Refusal(f"{where}.seccompProfile.type", f"{seccomp} turns syscall "
                             "filtering off", "remove it (RuntimeDefault is set)"))
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        found.append(Refusal(f"{where}.appArmorProfile.type", "Unconfined turns AppArmor off",
                             "remove it"))
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("user") or selinux.get("role") or selinux.get("type") not in (
            None, *SELINUX_TYPES):
        found.append(Refusal(f"{where}.seLinuxOptions", "sets an SELinux user, role or type "
                             "beyond the container ones", "remove it"))
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append(Refusal(f"{where}.windowsOptions.hostProcess", "runs on the host",
                             "remove it"))
    if pod and sc.get("sysctls"):
        found.append(Refusal(f"{where}.sysctls", "sets kernel parameters", "remove them"))
    if pod:
        return found
    if sc.get("privileged"):
        found.append(Refusal(f"{where}.privileged", "gives the container the node's devices and "
                             "every capability", "remove it"))
    if sc.get("allowPrivilegeEscalation"):
        found.append(Refusal(f"{where}.allowPrivilegeEscalation", "lets processes gain "
                             "privileges (setuid)", "remove it (the operator sets false)"))
    added = (sc.get("capabilities") or {}).get("add")
    if added:
        found.append(Refusal(f"{where}.capabilities.add", f"adds Linux capabilities "
                             f"{', '.join(map(str, added))}", "remove it (every capability is "
                             "dropped)"))
    if sc.get("procMount") not in (None, "Default"):
        found.append(Refusal(f"{where}.procMount", "unmasks /proc", "remove it"))
    return found


def describe(refusals: Sequence[Refusal]) -> str:
    """One message for the status condition and the event."""
    return " ".join(str(r) for r in refusals)
