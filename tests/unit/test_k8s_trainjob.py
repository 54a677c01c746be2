"""The Kubeflow Trainer TrainJob in k8s/trainjob, rendered with `kubectl kustomize` (offline, no cluster).

It is validated against the openAPIV3Schema of the TrainJob CRD vendored from a pinned kubeflow/trainer
release (k8s/schemas), closed the way `kubectl apply` (strict field validation) treats a structural schema:
a field the schema does not declare is an error, unless the schema sets x-kubernetes-preserve-unknown-fields.
The CRD's CEL rules are evaluated where the TrainJob sets the fields they guard. The rest holds the TrainJob
to the Job manifests: the same image, settings, Secret, security context and run id.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from job.config import load_config
from tests.unit.test_k8s import K8S, ROOT, _by_name, _container, _expand, _jobs, _render

TRAINJOB = "trainjob"
CRD_FILE = K8S / "schemas" / "trainer.kubeflow.org_trainjobs.yaml"
# The file as released in kubeflow/trainer v2.3.0 (k8s/schemas/README.md records the tag and commit).
CRD_SHA256 = "a742cafc5b5582640c7e0b7467c024fc237256fbca5ba0a9f0531dfb66d64416"
REFERENCE = "r1-llama-8b-en"  # the recipe k8s/trainjob/job.yaml copies
RUNTIME = "torch-distributed"
RUN_ID_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet's label on every pod; the JobSet is named as the TrainJob


# --- the schema -------------------------------------------------------------------------------------------


@cache
def _crd() -> dict:
    return yaml.load(CRD_FILE.read_text(), Loader=yaml.CSafeLoader)


def _closed(schema):
    """A copy of a CRD schema in which every object declares all the fields it accepts: where the API server
    would prune an unknown field (no x-kubernetes-preserve-unknown-fields), this schema rejects it instead."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    is_object = "properties" in schema or schema.get("type") == "object"
    if is_object and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def _validator() -> jsonschema.Draft4Validator:
    [version] = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    closed = _closed(schema)
    # The CRD declares the root's metadata as a bare object: the API server checks it as ObjectMeta, and so
    # does _validate_metadata.
    closed["properties"]["metadata"] = schema["properties"]["metadata"]
    # OpenAPI 3.0's schema object is based on JSON Schema draft 4 (the x-kubernetes-* keys are ignored here).
    jsonschema.Draft4Validator.check_schema(closed)
    return jsonschema.Draft4Validator(closed)


def _cel_rules(schema: dict, value, path: str = "") -> list[tuple[str, str, object]]:
    """The CEL rules (x-kubernetes-validations) of the schema nodes `value` populates, transition rules
    (oldSelf, checked only on update) left out: (path, rule, the value the rule's `self` is)."""
    rules = [(path, r["rule"], value) for r in schema.get("x-kubernetes-validations", []) if "oldSelf" not in r["rule"]]
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                rules += _cel_rules(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            rules += _cel_rules(schema["items"], item, f"{path}[{i}]")
    return rules


def _check_cel(rule: str, self_value) -> bool:
    """The shapes of CEL rule the TrainJob CRD puts on fields this TrainJob sets. Any other shape fails the
    test, so a newer CRD with a new rule is not passed unchecked."""
    if m := re.fullmatch(r"self\.metadata\.name\.matches\('([^']*)'\)", rule):
        return re.search(m[1], self_value["metadata"]["name"]) is not None
    if m := re.fullmatch(r"size\(self\.metadata\.name\) <= (\d+)", rule):
        return len(self_value["metadata"]["name"]) <= int(m[1])
    raise AssertionError(f"the TrainJob sets a field guarded by a CEL rule this test cannot evaluate: {rule}")


def _validate_metadata(obj: dict) -> None:
    # ObjectMeta as the API server checks it, with Kubernetes' own schema (strict: no unknown fields).
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                 kubernetes_validate.utils.latest_version(), strict=True)


def _schema_errors(obj: dict) -> list[str]:
    """What the CRD's schema, its CEL rules and ObjectMeta's schema refuse in `obj` (a TrainJob) on create, one
    line each. The trainer's admission webhook checks more (a runtime that exists, reserved env names)."""
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in _validator().iter_errors(obj)]
    if errors:
        return errors
    [version] = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1alpha1"]
    for path, rule, value in _cel_rules(version["schema"]["openAPIV3Schema"], obj):
        if not _check_cel(rule, value):
            errors.append(f"{path or '<root>'}: fails {rule}")
    try:
        _validate_metadata(obj)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"metadata: {e.message}")
    return errors


def _trainjob(objs=None) -> dict:
    [tj] = [o for o in (objs or _render(TRAINJOB)) if o["kind"] == "TrainJob"]
    return tj


def _pod_patch(tj: dict) -> dict:
    """The pod spec the TrainJob patches into the runtime's `node` replicated job."""
    [patch] = tj["spec"]["runtimePatches"]
    [node] = [j for j in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    return node["template"]["spec"]["template"]["spec"]


def test_vendored_crd_is_the_pinned_release_unmodified():
    assert hashlib.sha256(CRD_FILE.read_bytes()).hexdigest() == CRD_SHA256, \
        f"{CRD_FILE} is not the file released in kubeflow/trainer (see k8s/schemas/README.md)"
    assert CRD_SHA256 in (CRD_FILE.parent / "README.md").read_text()
    crd = _crd()
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "TrainJob"
    assert crd["spec"]["group"] == "trainer.kubeflow.org"


def test_trainjob_is_valid_against_the_crd_schema():
    tj = _trainjob()
    assert tj["apiVersion"] == f"{_crd()['spec']['group']}/v1alpha1"
    assert _schema_errors(tj) == []


def test_other_rendered_objects_pass_strict_kubernetes_validation():
    others = [o for o in _render(TRAINJOB) if o["kind"] != "TrainJob"]
    assert {o["kind"] for o in others} == {"ConfigMap"}
    for obj in others:
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)


def _parent(obj, path: str):
    """The container of the field at a dotted path (list items by index), and the field's key in it."""
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj, int(last) if isinstance(obj, list) else last


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        parent, key = _parent(obj, path)
        parent[key] = value
    return mutate


def _rename(path: str, new: str) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        parent, key = _parent(obj, path)
        parent[new] = parent.pop(key)
    return mutate


_POD = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec.template.spec"

# Each mistake, and the words of the error it must raise (so it is refused for the right reason).
MISTAKES = {
    "misspelled trainer field": (_rename("spec.trainer.numNodes", "numNode"), "'numNode' was unexpected"),
    "misspelled spec field": (_rename("spec.runtimeRef", "runtimeReference"), "'runtimeReference' was unexpected"),
    "numNodes as a string": (_set("spec.trainer.numNodes", "1"), "'1' is not of type 'integer'"),
    "numNodes a fraction": (_set("spec.trainer.numNodes", 1.5), "1.5 is not of type 'integer'"),
    "no runtimeRef": (lambda tj: tj["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    "env value not a string": (_set("spec.trainer.env.0.value", 1), "1 is not of type 'string'"),
    "misspelled pod field deep in runtimePatches": (_rename(f"{_POD}.nodeSelector", "nodeSelectors"),
                                                    "'nodeSelectors' was unexpected"),
    "misspelled container patch field": (_rename(f"{_POD}.containers.0.volumeMounts", "volumeMount"),
                                         "'volumeMount' was unexpected"),
    "container patch cannot set resources": (_set(f"{_POD}.containers.0.resources", {"limits": {"cpu": "1"}}),
                                             "'resources' was unexpected"),
    "GPU count not a quantity": (lambda tj: tj["spec"]["trainer"]["resourcesPerNode"]["limits"].update(
        {"nvidia.com/gpu": "one"}), "'one' does not match"),
    "name not an RFC 1035 label": (_set("metadata.name", "1-medft"), "fails self.metadata.name.matches"),
    "name too long": (_set("metadata.name", "m" * 64), "fails size(self.metadata.name) <= 63"),
    "unknown metadata field": (_set("metadata.label", {"a": "b"}), "'label' was unexpected"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_validation_rejects_a_wrong_trainjob(mistake):
    # The same validation, on the TrainJob with one mistake: it must be refused, or the test above proves nothing.
    mutate, expected = MISTAKES[mistake]
    tj = copy.deepcopy(_trainjob())
    mutate(tj)
    errors = _schema_errors(tj)
    assert any(expected in e for e in errors), f"{mistake}: {errors or 'accepted'}"


def test_closing_keeps_fields_the_schema_preserves_open():
    schema = {"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
    }}
    validator = jsonschema.Draft4Validator(_closed(schema))
    assert validator.is_valid({"closed": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"}})
    assert not validator.is_valid({"closed": {"a": "x", "b": "y"}})
    assert not validator.is_valid({"other": 1})
    assert not validator.is_valid({"map": {"k": 1}})


# --- what the TrainJob runs, and where ----------------------------------------------------------------------


def test_runs_on_the_torch_distributed_cluster_runtime():
    tj = _trainjob()
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": RUNTIME}


def test_nodes_and_gpus_per_node_are_set_once_and_are_one_by_default():
    tj = _trainjob()
    trainer = tj["spec"]["trainer"]
    # numProcPerNode unset: the runtime starts one process per GPU of resourcesPerNode, so the GPU count is the
    # only per-node number to edit.
    assert "numProcPerNode" not in trainer
    # The reference recipe on one GPU, as the Job runs it; more split its rows per step (docs/kubernetes.md).
    assert trainer["numNodes"] == 1
    assert str(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == "1"


def test_same_image_resources_command_and_deadline_as_the_job():
    tj, [job] = _trainjob(), _jobs("base")
    container, trainer = _container(job), tj["spec"]["trainer"]
    assert trainer["image"] == container["image"]
    assert trainer["resourcesPerNode"] == container["resources"]
    # The image's ENTRYPOINT under torchrun, which takes the runtime's PET_* settings and starts a rank per GPU.
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)[1])
    assert trainer["command"] == ["torchrun", "--no-python", *entrypoint] and trainer["args"] == container["args"]
    assert tj["spec"]["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"]


def test_same_pod_security_placement_and_volumes_as_the_job():
    pod, [job] = _pod_patch(_trainjob()), _jobs("base")
    job_pod = job["spec"]["template"]["spec"]
    for key in ("securityContext", "nodeSelector", "tolerations", "terminationGracePeriodSeconds"):
        assert pod[key] == job_pod[key], key
    [container] = pod["containers"]
    assert container["name"] == "node"  # the trainer container of the torch-distributed runtime
    assert container["securityContext"] == _container(job)["securityContext"]
    assert container["volumeMounts"] == _container(job)["volumeMounts"]

    def unnamed(volumes):  # the ConfigMap behind `config` is each kustomization's own job.yaml
        return [{**v, "configMap": {}} if "configMap" in v else v for v in volumes]
    assert unnamed(pod["volumes"]) == unnamed(job_pod["volumes"])


def test_settings_and_credentials_are_the_jobs():
    objs = _render(TRAINJOB)
    env = _trainjob(objs)["spec"]["trainer"]["env"]
    settings = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("medft-env-")]
    assert len(settings) == 1
    from_settings = {v["valueFrom"]["configMapKeyRef"]["key"]: v for v in env if "configMapKeyRef" in v.get("valueFrom", {})}
    # Every setting in k8s/settings/settings.env reaches the container (there is no envFrom in a TrainJob)...
    assert set(settings[0]["data"]) <= set(from_settings), set(settings[0]["data"]) - set(from_settings)
    for key, var in from_settings.items():
        ref = var["valueFrom"]["configMapKeyRef"]
        # ...under its own name, from the generated ConfigMap (its name ends in a hash kustomize must rewrite).
        assert var["name"] == key and ref["name"] == settings[0]["metadata"]["name"], var
        assert key in settings[0]["data"] or ref.get("optional") is True, f"{key} is in no settings.env"
    secret_env = [v for v in env if "secretKeyRef" in v.get("valueFrom", {})]
    [job] = _jobs("base")
    assert secret_env == [v for v in _container(job)["env"] if "secretKeyRef" in v.get("valueFrom", {})]
    assert not any("value" in v and re.search(r"SECRET|TOKEN|PASSWORD|KEY", v["name"]) for v in env)
    assert not [o for o in objs if o["kind"] == "Secret"], "the Secret is created by hand, never rendered"


def _pod_env(objs, tj: dict) -> dict[str, str]:
    """The trainer container's environment as the kubelet builds it from spec.trainer.env."""
    env: dict[str, str] = {}
    for var in tj["spec"]["trainer"]["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = _by_name(objs, "ConfigMap", ref["name"])["data"]
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == f"metadata.labels['{RUN_ID_LABEL}']", source
            env[var["name"]] = tj["metadata"]["name"]
        elif "secretKeyRef" in source:
            env[var["name"]] = "from-the-secret"
    return env


def test_the_pod_resolves_the_reference_recipe_with_the_trainjob_name_as_run_id(tmp_path):
    objs = _render(TRAINJOB)
    tj = _trainjob(objs)
    env = _pod_env(objs, tj)
    args = tj["spec"]["trainer"]["args"]
    config_path = PurePosixPath(args[args.index("--config") + 1])
    pod = _pod_patch(tj)
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if config_path.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    for key, text in _by_name(objs, "ConfigMap", volume["configMap"]["name"])["data"].items():
        (tmp_path / key).write_text(text)
    cfg = load_config(tmp_path / config_path.relative_to(mount["mountPath"]), env=env)
    # The run id survives a replaced pod (JobSet's label is the TrainJob's name), and the run goes to the store.
    assert cfg.output.run_id == tj["metadata"]["name"]
    assert cfg.output.store == env["MEDFT_STORE"] and cfg.output.store.startswith("s3://")


def test_job_config_matches_the_reference_recipe():
    mounted = load_config(K8S / TRAINJOB / "job.yaml", env={})
    reference = load_config(ROOT / "configs" / f"{REFERENCE}.yaml", env={})
    assert mounted == reference, f"k8s/{TRAINJOB}/job.yaml drifted from configs/{REFERENCE}.yaml"


def test_the_cli_accepts_the_trainjob_arguments():
    from job.cli import cli

    args = _trainjob()["spec"]["trainer"]["args"]
    result = CliRunner().invoke(cli, [*args, "--help"])  # --help is eager: options parsed, nothing runs
    assert result.exit_code == 0, f"medft {' '.join(args)}: {result.output}"


# --- the Kueue option -------------------------------------------------------------------------------------


def test_kueue_component_queues_a_suspended_trainjob_that_stays_valid(tmp_path):
    kustomization = K8S / TRAINJOB / "kustomization.yaml"
    assert re.search(r"^\s*# - kueue$", kustomization.read_text(), re.M), "the Kueue option is shown, off"
    # An overlay that switches the component on (relative paths: kustomize refuses absolute ones).
    rel = Path(os.path.relpath(K8S / TRAINJOB, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel)], "components": [str(rel / "kueue")]}))
    tj = _trainjob(_render(str(tmp_path)))
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert tj["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert _schema_errors(tj) == []
    assert tj["spec"]["trainer"] == _trainjob()["spec"]["trainer"]
