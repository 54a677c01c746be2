"""The Kubernetes manifests, rendered with `kubectl kustomize` (offline, no cluster) and held to what the
Job must do: schema-valid objects, a failure policy that agrees with the CLI's exit codes, a restricted
security context, no credentials in any manifest, and a pod environment that resolves to the intended
job config and run id. The pod start is simulated: Kubernetes' $(VAR) expansion, the mounted ConfigMap and
the container command are reproduced here, with a stand-in `medft` that records what it was given.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from job.config import load_config
from registry.errors import PERMANENT_EXIT_CODES
from tests.unit.test_dockerfile import FINAL, _env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS), "registry-list"]
TRAINING = [t for t in TARGETS if t != "registry-list"]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE_UID = int(FINAL.all("USER")[-1].split(":")[0])
# The overlay that is not a copy of one reference config, and the config it varies.
SWEEP, SWEEP_REFERENCE = "sweep", "r1-qwen-1.5b-en"


@cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not on PATH: the manifests are rendered with `kubectl kustomize`")
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {target}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _jobs(target: str) -> list[dict]:
    return [o for o in _render(target) if o["kind"] == "Job"]


def _by_name(objs, kind: str, name: str) -> dict:
    [obj] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _container(job: dict) -> dict:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


# --- kustomize builds and the API server's schema accepts it -------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_kustomization_renders_one_job(target):
    assert len(_jobs(target)) == 1


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("k8s_version", ["1.33", kubernetes_validate.utils.latest_version()])
def test_rendered_objects_pass_strict_schema_validation(target, k8s_version):
    # Strict: an unknown field (a typo like podFailurePolicys) is an error, not silently dropped. The
    # oldest schema the validator ships, and the newest.
    for obj in _render(target):
        kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_overlays_cover_the_reference_models_and_a_sweep():
    assert {"r1-llama-8b-en", "r1-qwen-7b-en", "r1-qwen-1.5b-en", SWEEP} <= set(OVERLAYS)


# --- failure and retry policy ---------------------------------------------------------------------------


@pytest.fixture
def lease_seconds(monkeypatch):
    from job.lifecycle import Lease

    monkeypatch.delenv("MEDFT_LEASE_SECONDS", raising=False)
    return Lease(None).ttl  # the default a Job gets, as the code defines it


@pytest.mark.parametrize("target", TRAINING)
def test_pod_failure_policy_agrees_with_the_cli_exit_codes(target, lease_seconds):
    [job] = _jobs(target)
    spec = job["spec"]
    indexed = spec.get("completionMode") == "Indexed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    # A replacement waits until the old pod is gone, so two pods never write the same run.
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    on_codes = [r for r in rules if "onExitCodes" in r]
    assert len(on_codes) == 1, rules
    rule = on_codes[0]
    assert rule["onExitCodes"]["operator"] == "In"
    assert rule["onExitCodes"]["containerName"] == _container(job)["name"]
    # Exactly the permanent codes: 75 (transient) and 143 (checkpointed on SIGTERM) must stay retryable.
    assert sorted(rule["onExitCodes"]["values"]) == sorted(PERMANENT_EXIT_CODES)
    if indexed:
        # One bad configuration fails its own index, not the whole sweep.
        assert rule["action"] == "FailIndex"
        assert "backoffLimit" not in spec
        retries = spec["backoffLimitPerIndex"]
    else:
        assert rule["action"] == "FailJob"
        retries = spec["backoffLimit"]
    # A pod killed without releasing the run's lease blocks its replacements (exit 75) until the lease
    # expires; the controller's back-off (10 s doubling, 6 min cap) over the retry budget must outlast it.
    backoff = sum(min(10 * 2**n, 360) for n in range(retries))
    assert retries <= 10 and backoff >= 2 * lease_seconds, (retries, backoff, lease_seconds)
    # Preemption and drains do not use up retries.
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


@pytest.mark.parametrize("target", TRAINING)
def test_time_limits_leave_room_for_the_sigterm_checkpoint(target):
    [job] = _jobs(target)
    spec = job["spec"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 120 <= grace <= 900
    assert spec["activeDeadlineSeconds"] >= 3600
    assert spec["ttlSecondsAfterFinished"] >= 3600  # logs are still there when you look the next morning


@pytest.mark.parametrize("target", TRAINING)
def test_training_asks_for_one_gpu_on_gpu_nodes(target):
    [job] = _jobs(target)
    pod = job["spec"]["template"]["spec"]
    assert str(_container(job)["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["nodeSelector"] and pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in _container(job)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


# --- security -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_pods_meet_the_restricted_pod_security_standard(target):
    for job in _jobs(target):
        pod = job["spec"]["template"]["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        # The image's fixed UID, so files the image ships and volume ownership (fsGroup) line up.
        assert psc["runAsUser"] == IMAGE_UID and psc["fsGroup"] == psc["runAsGroup"]
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all("hostPath" not in v for v in pod["volumes"])
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert not sc.get("privileged") and sc.get("runAsUser", IMAGE_UID) != 0


@pytest.mark.parametrize("target", TARGETS)
def test_every_path_the_image_writes_is_a_writable_volume(target):
    # readOnlyRootFilesystem: each cache directory the image points at must sit on a writable mount.
    image_env = _env(FINAL)
    for job in _jobs(target):
        mounts = _container(job)["volumeMounts"]
        writable = [PurePosixPath(m["mountPath"]) for m in mounts if not m.get("readOnly")]
        for name in ("HOME", "TMPDIR", "HF_HOME", "MEDFT_CACHE", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                     "UNSLOTH_COMPILE_LOCATION"):
            path = PurePosixPath(image_env[name])
            assert any(path.is_relative_to(m) for m in writable), f"{target}: {name}={path} is read-only"
        # An emptyDir starts empty and TMPDIR's users do not create it: it must be a mount point itself.
        assert PurePosixPath(image_env["TMPDIR"]) in writable


_SECRETISH = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
_CREDENTIAL_SHAPES = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|"
                                r"(?i:aws_secret_access_key)\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}")


@pytest.mark.parametrize("target", TARGETS)
def test_credentials_come_only_from_the_secret(target):
    objs = _render(target)
    assert not [o for o in objs if o["kind"] == "Secret"], "the Secret is created by hand, never rendered"
    for job in _jobs(target):
        container = _container(job)
        for var in container.get("env", []):
            if _SECRETISH.search(var["name"]):
                assert "value" not in var, f"{var['name']} has a literal value"
                assert var["valueFrom"]["secretKeyRef"]["name"] == "medft-credentials", var
        assert not any("secretRef" in e for e in container.get("envFrom", [])), "list the secret's keys"
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        for key, value in cm["data"].items():
            assert not _SECRETISH.search(key), f"ConfigMap {cm['metadata']['name']} has a key {key}"
            assert not _CREDENTIAL_SHAPES.search(value), f"ConfigMap {cm['metadata']['name']}/{key}"
            if key == "job.yaml":
                assert not _SECRETISH.search(value), "credentials never belong in the job config"


def test_no_file_under_k8s_holds_a_credential():
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not _CREDENTIAL_SHAPES.search(path.read_text()), path


@pytest.mark.parametrize("target", TARGETS)
def test_image_is_the_version_make_image_tags(target):
    for job in _jobs(target):
        image = _container(job)["image"]
        assert image.endswith(f"/medft:{VERSION}"), f"{target}: {image}, but `make image` tags {VERSION}"


# --- the pod as it would start --------------------------------------------------------------------------


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, undefined ones kept, $$ escapes a $."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _field(pod_meta: dict, path: str) -> str:
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return pod_meta[m[1]].get(m[2], "")
    assert path in ("metadata.name", "metadata.namespace", "metadata.uid"), path
    return pod_meta[path.split(".")[1]]


def _pod_env(objs, job: dict, pod_name: str, index: int | None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order, each value
    expanded against the variables defined before it."""
    container = _container(job)
    meta = {"name": pod_name, "namespace": "default", "uid": pod_name + "-uid",
            "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}, "annotations": {}}
    if index is not None:
        meta["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_by_name(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = _field(meta, var["valueFrom"]["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = "from-the-secret"
    return env


_STAND_IN = """#!{python}
import json, os, sys
with open(os.environ["STAND_IN_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}}, f)
"""


def _start(objs, job: dict, tmp_path: Path, pod_name: str, index: int | None = None) -> tuple[int, dict | None]:
    """Run the container's command with a stand-in `medft` on PATH; returns its exit code and record."""
    container = _container(job)
    env = _pod_env(objs, job, pod_name, index)
    argv = [_expand(a, env) for a in container.get("command", ["medft"]) + container.get("args", [])]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "medft"
    stand_in.write_text(_STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    out = tmp_path / f"{pod_name}.json"
    out.unlink(missing_ok=True)
    argv = [str(stand_in)] + argv[1:] if argv[0] == "medft" else argv
    proc = subprocess.Popen(argv, env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "STAND_IN_OUT": str(out)},
                            stderr=subprocess.DEVNULL)
    proc.communicate(timeout=30)
    record = json.loads(out.read_text()) if out.exists() else None
    if record is not None:
        # exec, not a child: medft must be the process the kubelet signals, or SIGTERM never reaches it.
        assert record["pid"] == proc.pid, f"{job['metadata']['name']}: the command does not exec medft"
    return proc.returncode, record


def _mounted_config(objs, job: dict, tmp_path: Path, argv: list[str]) -> Path:
    """Write the ConfigMap where its volume is mounted (under tmp_path) and return the --config path."""
    pod = job["spec"]["template"]["spec"]
    config_path = PurePosixPath(argv[argv.index("--config") + 1])
    for mount in _container(job)["volumeMounts"]:
        if config_path.is_relative_to(mount["mountPath"]):
            [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            data = _by_name(objs, "ConfigMap", volume["configMap"]["name"])["data"]
            local = tmp_path / "mnt" / pod["containers"][0]["name"]
            local.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (local / key).write_text(text)
            return local / config_path.relative_to(mount["mountPath"])
    raise AssertionError(f"--config {config_path} is on no mounted volume")


def _train_config(objs, job, record, tmp_path):
    argv = record["argv"]
    assert argv[0] == "train"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(_mounted_config(objs, job, tmp_path, argv), sets, env=record["env"])


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != SWEEP])
def test_single_run_pod_resolves_its_config_and_keeps_its_run_id_across_retries(overlay, tmp_path):
    objs = _render(f"overlays/{overlay}")
    [job] = _jobs(f"overlays/{overlay}")
    configs = []
    # Two pods of the same Job, as after a preemption: different pod names, one run id.
    for pod_name in (job["metadata"]["name"] + "-x7k2p", job["metadata"]["name"] + "-q9w4d"):
        code, record = _start(objs, job, tmp_path, pod_name)
        assert code == 0 and record, f"{overlay}: the container did not start medft"
        configs.append(_train_config(objs, job, record, tmp_path))
    first, retry = configs
    assert first.output.run_id == retry.output.run_id == job["metadata"]["name"]
    # Pods keep nothing: the run must go to the object store from k8s/settings.
    assert first.output.store.startswith("s3://")
    assert first == retry


def test_sweep_gives_each_index_its_learning_rate_and_run_id(tmp_path):
    objs = _render(f"overlays/{SWEEP}")
    [job] = _jobs(f"overlays/{SWEEP}")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    rates = _pod_env(objs, job, "p", 0)["MEDFT_SWEEP_LEARNING_RATES"].split()
    assert spec["completions"] == len(rates) >= 2, "one index per learning rate"
    seen = {}
    for index in range(spec["completions"]):
        code, record = _start(objs, job, tmp_path, f"{job['metadata']['name']}-{index}-abcde", index)
        assert code == 0 and record, f"index {index}: medft was not started"
        cfg = _train_config(objs, job, record, tmp_path)
        assert cfg.train.learning_rate == float(rates[index])
        assert cfg.output.run_id == f"{job['metadata']['name']}-{index}"
        assert cfg.output.store.startswith("s3://")
        seen[cfg.output.run_id] = cfg.train.learning_rate
    assert len(seen) == len(rates)
    # An index with no rate (completions raised, list not) stops as a config error: permanent, so the
    # FailIndex rule ends it instead of retrying it.
    code, record = _start(objs, job, tmp_path, "extra", spec["completions"])
    assert record is None and code == 2 and code in PERMANENT_EXIT_CODES


@pytest.mark.parametrize("target", TRAINING)
def test_job_names_fit_kubernetes_and_run_id_limits(target):
    for job in _jobs(target):
        name = job["metadata"]["name"]
        # Indexed pods use <job>-<index> as their hostname, a DNS label: no dots, at most 63 characters.
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 56, name


# --- the overlays' job configs stay in step with configs/ ----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_job_config_matches_its_reference_config(overlay):
    mounted = load_config(K8S / "overlays" / overlay / "job.yaml", env={})  # validates on its own
    reference_name = SWEEP_REFERENCE if overlay == SWEEP else overlay
    if not (ROOT / "configs" / f"{reference_name}.yaml").exists():
        return  # a user's own overlay: no reference recipe to follow, validating is all there is
    reference = load_config(ROOT / "configs" / f"{reference_name}.yaml", env={})
    if overlay == SWEEP:
        # Same recipe; its runs register under their own name and take no alias, so several indices never
        # race for one alias and a sweep never moves 'candidate'.
        assert mounted.model_copy(update={"output": reference.output}) == reference
        assert mounted.output.aliases == () and mounted.output.model_name != reference.output.model_name
    else:
        diff = {k: (v, reference.to_dict()[k]) for k, v in mounted.to_dict().items() if v != reference.to_dict()[k]}
        assert not diff, f"k8s/overlays/{overlay}/job.yaml drifted from configs/{overlay}.yaml: {diff}"


# --- the commands in the manifests are ones the CLI accepts -----------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_cli_accepts_the_manifest_arguments(target):
    from job.cli import cli

    objs = _render(target)
    for job in _jobs(target):
        env = _pod_env(objs, job, "p", 0)
        container = _container(job)
        if container.get("command"):
            argv = re.search(r"exec medft (.*)", container["args"][0])[1].split()
        else:
            argv = [_expand(a, env) for a in container["args"]]
        # --help is eager: the arguments are parsed (an unknown option fails), nothing runs.
        result = CliRunner().invoke(cli, [*argv, "--help"])
        assert result.exit_code == 0, f"medft {' '.join(argv)}: {result.output}"


def test_registry_lookup_lists_the_store_training_writes_to():
    objs = _render("registry-list")
    [job] = _jobs("registry-list")
    argv = [_expand(a, _pod_env(objs, job, "p", None)) for a in _container(job)["args"]]
    train_objs = _render(f"overlays/{OVERLAYS[0]}")
    [train_job] = _jobs(f"overlays/{OVERLAYS[0]}")
    store = _pod_env(train_objs, train_job, "p", None)["MEDFT_STORE"]
    assert argv == ["registry", "list", "--store", store]
