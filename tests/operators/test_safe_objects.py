"""End to end: the kopf operator refuses StagedTrainings that would widen privilege, says why on
each one's status and in one event, and creates no RayJob for them (while serving a good one)."""

from __future__ import annotations

import copy

from operators.rayjob import build_ray_cluster_spec
from operators.resource import DEFAULT_IMAGE, StagedTrainingSpec
from tests.operators import test_operator_kmock as e2e
from tests.operators.conftest import tiny_spec
from tests.operators.test_operator_kmock import NS, RAYJOBS, TRAININGS, wait_for

# The emulated API (with the manifests' RBAC) and the operator processes, as the e2e tests
# of test_operator_kmock.py set them up.
api, operator = e2e.api, e2e.operator
TEMPLATE = "spec.ray_cluster.template"


def post(api, name: str, spec: dict) -> None:
    api.request("POST", TRAININGS, {
        "apiVersion": "ringpilot.io/v1alpha1", "kind": "StagedTraining",
        # KMock stores what it is given: it assigns no uid or generation itself.
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": spec})


def host_network_spec() -> dict:
    template = copy.deepcopy(build_ray_cluster_spec(
        StagedTrainingSpec.model_validate(tiny_spec()), excluded=[]))
    template["workerGroupSpecs"][0]["template"]["spec"]["hostNetwork"] = True
    return {**tiny_spec(), "ray_cluster": {"template": template}}


def test_refused_objects_get_one_message_and_no_rayjob(api, operator, monkeypatch):
    monkeypatch.setenv("RINGPILOT_ALLOWED_IMAGES", DEFAULT_IMAGE)  # what the Deployment sets
    operator()
    refused = {"unsafe": f"{TEMPLATE}.workerGroupSpecs[0].template.spec.hostNetwork: ",
               "offlist": "spec.image: "}
    post(api, "unsafe", host_network_spec())
    post(api, "offlist", {**tiny_spec(), "image": "docker.io/evil/miner:1"})
    post(api, "tiny", tiny_spec())  # served by the same operator: it was reconciling all along
    wait_for("the good object's RayJob", lambda: any(
        j["metadata"]["name"].startswith("tiny-") for j in api.list(RAYJOBS)))
    for name, field in refused.items():
        wait_for(f"{name} refused", lambda n=name: (api.request(
            "GET", f"{TRAININGS}/{n}").get("status") or {}).get("phase") == "Failed")
        status = api.request("GET", f"{TRAININGS}/{name}")["status"]
        [cond] = [c for c in status["conditions"] if c["type"] == "SpecValid"]
        assert (cond["status"], cond["reason"]) == ("False", "Refused")
        assert cond["message"].startswith(field) and "Fix: " in cond["message"]
        events = [e for e in api.list(f"/api/v1/namespaces/{NS}/events")
                  if e["involvedObject"]["name"] == name]
        assert [(e["type"], e["reason"], e["message"]) for e in events] == [
            ("Warning", "Refused", cond["message"])]
    owners = {o["name"] for j in api.list(RAYJOBS) for o in j["metadata"]["ownerReferences"]}
    assert owners == {"tiny"}
    maps = {m["metadata"]["name"] for m in api.list(f"/api/v1/namespaces/{NS}/configmaps")}
    assert "unsafe-run" not in maps and "offlist-run" not in maps
