"""Drift: every argument and env var the manifests pass to a program is one it accepts."""

from __future__ import annotations

import shlex

import pytest
import yaml

from operators.__main__ import build_arg_parser as operator_parser
from operators.rayjob import RUN_DIR, RUN_FILE, build_rayjob
from operators.resource import StagedTrainingSpec
from ray_jobs.train import driver as train
from ray_jobs.train.driver import build_arg_parser as train_parser
from tests.manifests.conftest import KUSTOMIZATIONS, MANIFESTS, kustomize, load, samples


def rayjobs() -> list[dict]:
    jobs = []
    for path in samples():
        obj = load(path)
        if obj["kind"] != "StagedTraining":
            continue
        spec = StagedTrainingSpec.model_validate(obj["spec"])
        st = {**obj, "metadata": {**obj["metadata"], "namespace": "ns", "uid": "u"}}
        jobs += [build_rayjob(st, spec, s.name, 1, []) for s in spec.stages]
    return jobs


@pytest.mark.parametrize("job", rayjobs(), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoint_parses_with_the_trainers_parser(job):
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "ray_jobs.train"]
    args = train_parser().parse_args(words[3:])
    assert args.stage == job["metadata"]["labels"]["ringpilot.io/stage"]
    assert str(args.run) == RUN_FILE
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # --run is relative to the job's working dir: the submitter uploads the mounted ConfigMap.
    assert runtime_env["working_dir"] == RUN_DIR
    mounts = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "run", "mountPath": RUN_DIR, "readOnly": True} in mounts
    source = open(train.__file__).read()
    for name in runtime_env.get("env_vars", {}):
        assert name.startswith("RAY_") or name in source, \
            f"{name} is not read by ray_jobs.train.driver"


def test_an_unknown_trainer_argument_would_be_caught():
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--run", "run.yaml", "--stages", "s1"])


@pytest.mark.parametrize("subdir", KUSTOMIZATIONS)
def test_operator_deployment_args_and_env_are_accepted(subdir):
    [deploy] = [d for d in kustomize(subdir) if d["kind"] == "Deployment"]
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "operators"]
    env = {e["name"]: e for e in container["env"]}
    args = [a.replace("$(POD_NAMESPACE)", "ringpilot") for a in container["args"]]
    parsed = operator_parser().parse_args(args)
    assert parsed.namespace == "ringpilot" and parsed.liveness.endswith("/healthz")
    from operators import __main__ as entry
    from operators import handlers

    code = open(entry.__file__).read() + open(handlers.__file__).read()
    for name in env:
        assert name in code, f"the Deployment sets {name}, which the operator never reads"
    for name in ("RINGPILOT_POLL_SECONDS", "RINGPILOT_BACKOFF_SECONDS"):
        float(env[name]["value"])


def test_samples_dir_exists():
    assert (MANIFESTS / "samples").is_dir()


@pytest.mark.parametrize("sample", ["staged-training.tiny.yaml",
                                    "staged-training.llama3-8b-1m.yaml"])
def test_the_jobs_working_dir_is_a_run_the_trainer_accepts(sample, tmp_path, capsys):
    """What the submitter uploads (the run ConfigMap's files) passes `ringpilot validate`."""
    from operators.decide import ApplyConfigMap, plan_reconcile
    from ringpilot.cli import main as ringpilot
    from tests.manifests.conftest import load_all
    from tests.operators.conftest import T0

    docs = load_all(MANIFESTS / "samples" / sample)
    st = {**docs[-1], "metadata": {**docs[-1]["metadata"], "namespace": "ns", "uid": "u",
                                   "generation": 1}}
    cluster_yaml = docs[0]["data"]["cluster.yaml"] if len(docs) > 1 else None
    decision = plan_reconcile(st, [], [], T0, cluster_yaml=cluster_yaml)
    [cm] = decision.of(ApplyConfigMap)
    for name, text in cm.body["data"].items():
        (tmp_path / name).write_text(text)
    assert ringpilot(["validate", str(tmp_path / RUN_FILE)]) == 0, capsys.readouterr().err
