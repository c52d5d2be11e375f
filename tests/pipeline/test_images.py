"""The container images' recipes, without building them (the end-to-end tests build and run them with
scripts/build-images --testbed): the Dockerfiles take their bases as build arguments and write nothing
into the build context; scripts/build-images' content hash, which tags and caches the test bed's
images, changes with what goes into an image and with nothing else; the pause program stops cleanly."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_images", ROOT / "images" / "build_images.py")
assert _spec and _spec.loader
build_images = importlib.util.module_from_spec(_spec)
sys.modules["build_images"] = build_images  # dataclasses look their module up by name
_spec.loader.exec_module(build_images)

DOCKERFILES = {
    "operator": "images/operator/Dockerfile",
    "ray-worker": "images/ray-worker/Dockerfile",
    "ray-base": "images/ray-base/Dockerfile",
    "pause": "images/pause/Dockerfile",
}
BASE_ARGS = {"operator": "PYTHON_IMAGE", "ray-worker": "RAY_IMAGE", "ray-base": "PYTHON_IMAGE"}


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / path).read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def mounts(path: str) -> list[dict[str, str]]:
    found = []
    for ins, args in instructions(path):
        if ins == "RUN":
            for spec in re.findall(r"--mount=(\S+)", args):
                found.append(dict(item.partition("=")[::2] for item in spec.split(",")))
    return found


def context_sources(path: str) -> set[str]:
    """What a Dockerfile reads from its build context: COPY sources and bind mounts' sources
    (those `from` another stage excepted)."""
    sources = {m["source"] for m in mounts(path) if m.get("type") == "bind" and "from" not in m}
    for ins, args in instructions(path):
        if ins == "COPY" and "--from=" not in args:
            sources.update(a for a in args.split()[:-1] if not a.startswith("--"))
    return sources


def locked_version(package: str) -> str:
    return build_images.locked_version(package)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_read_their_context_only_by_copy(name):
    """No RUN --mount: a rw bind writes into the build context, and buildah's layer cache (1.28) does
    not look into a bind mount's content, so that a changed requirements.lock or package would reuse a
    stale layer. COPY's cache is keyed by what it copies, in every engine."""
    assert not mounts(DOCKERFILES[name])
    assert all("--mount" not in args for ins, args in instructions(DOCKERFILES[name]))


@pytest.mark.parametrize("name", sorted(BASE_ARGS))
def test_dockerfiles_take_their_base_as_a_build_argument(name):
    steps = instructions(DOCKERFILES[name])
    arg = BASE_ARGS[name]
    first_from = next(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    assert any(ins == "ARG" and a.startswith(f"{arg}=") for ins, a in steps[:first_from]), steps[:first_from]
    stages = []
    for ins, args in steps:
        if ins == "FROM":
            words = args.split()
            assert words[0] == f"${{{arg}}}" or words[0] in stages, args
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(words[2])
    assert steps[-1][0] != "FROM"


def test_the_ray_worker_base_follows_the_locked_ray_version():
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    default = build_images.dockerfile_arg_default(DOCKERFILES["ray-worker"], "RAY_IMAGE")
    assert default == f"rayproject/ray:{locked_version('ray')}-{python}"


def test_the_ray_base_has_what_kuberay_and_the_ray_worker_use():
    text = "\n".join(args for ins, args in instructions(DOCKERFILES["ray-base"]) if ins in ("RUN", "ENV", "USER"))
    assert "--uid 1000 --gid 100" in text and "--home-dir /home/ray" in text
    assert "wget" in text and '"ray[default]"' in text and "-c /tmp/ray-base/requirements.lock" in text
    assert "/etc/profile.d/" in text  # KubeRay's `bash -lc`: Debian's /etc/profile resets PATH
    assert [a for ins, a in instructions(DOCKERFILES["ray-base"]) if ins == "USER"][-1] == "1000:100"


@pytest.mark.parametrize("role", ["operator", "ray-worker", "pause"])
def test_an_images_hash_covers_every_file_its_dockerfile_reads(role):
    image = build_images.plan([role], testbed=True, local_bases=True, extras="pipeline")[role]
    covered = set(image.context)
    for source in context_sources(image.dockerfile):
        if role == "pause" and source == "images/pause/pause":
            continue  # compiled from pause.c, which is covered, into the staged context
        assert source in covered or any(source.startswith(c + "/") for c in covered), source


def test_ray_worker_extras_default_and_the_testbed_tag():
    steps = instructions(DOCKERFILES["ray-worker"])
    assert "EXTRAS=pipeline,formats" in [a for ins, a in steps if ins == "ARG"]
    args = build_images.parse_args([])
    assert args.extras == "pipeline,formats"


# ------------------------------------------------------------------------------------------------------
# The content hash, on a copy of the files that go into the images


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    for rel in ["requirements.lock", "operator/pyproject.toml", *DOCKERFILES.values(), "images/pause/pause.c"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, root / rel)
    package = root / "operator" / "laion_operator"
    package.mkdir()
    (package / "__init__.py").write_text('"""package"""\n')
    (package / "cli.py").write_text("def script():\n    pass\n")
    (package / "crd.yaml").write_text("kind: CustomResourceDefinition\n")
    return root


def hashes(root: Path, **options) -> dict[str, str]:
    settings = {"testbed": True, "local_bases": True, "extras": "pipeline", **options}
    images = build_images.plan(["operator", "ray-worker", "pause"], root=root, **settings)
    found = {role: image.digest for role, image in images.items()}
    for role, built_on in (("ray-base", "ray-worker"), ("python-base", "operator")):
        base = images[built_on].base
        found[role] = base.digest if base else "none"
    return found


def test_the_hash_is_stable_and_names_the_testbed_images(tree):
    first = hashes(tree)
    assert first == hashes(tree)
    images = build_images.plan(["operator", "ray-worker", "pause"], testbed=True, local_bases=True, extras="pipeline")
    for role, image in images.items():
        repository, tag = image.name.rsplit(":", 1)
        assert repository == build_images.TESTBED_REPOSITORIES[role]
        assert re.fullmatch(rf"{re.escape(build_images.project_version())}-dev\.[0-9a-f]{{12}}", tag), tag
        assert tag.endswith(image.digest[:12])
    # as a node's containerd names the chart's images (docker.io/ is implied there)
    values = yaml.safe_load((ROOT / "charts" / "laion-operator" / "values.yaml").read_text())
    assert images["operator"].name.startswith(f"docker.io/{values['image']['repository']}:")
    assert images["ray-worker"].name.startswith(f"docker.io/{values['rayWorkerImage']['repository']}:")
    # the ray-worker builds on the Ray base, named by its hash, which builds on the Python base
    assert images["ray-worker"].args["RAY_IMAGE"] == images["ray-worker"].base.name
    assert images["ray-worker"].base.args["PYTHON_IMAGE"] == images["operator"].args["PYTHON_IMAGE"]
    assert images["ray-worker"].args["EXTRAS"] == "pipeline"


def test_the_hash_ignores_caches_and_build_outputs(tree):
    before = hashes(tree)
    package = tree / "operator" / "laion_operator"
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0")
    (package / "stale.pyc").write_bytes(b"\0")
    (tree / "operator" / "laion_operator.egg-info").mkdir()
    (tree / "operator" / "laion_operator.egg-info" / "PKG-INFO").write_text("x")
    (tree / "operator" / "build" / "lib").mkdir(parents=True)
    (tree / "operator" / "build" / "lib" / "cli.py").write_text("x")
    (tree / "README.md").write_text("not in any image")
    (tree / "tests").mkdir()
    (tree / "tests" / "test_x.py").write_text("x")
    assert hashes(tree) == before


@pytest.mark.parametrize(
    "change, changed",
    [
        ("operator/laion_operator/cli.py", {"operator", "ray-worker"}),
        ("operator/laion_operator/new.py", {"operator", "ray-worker"}),
        ("operator/laion_operator/crd.yaml", {"operator", "ray-worker"}),
        ("operator/pyproject.toml", {"operator", "ray-worker"}),
        ("requirements.lock", {"operator", "ray-worker", "ray-base"}),
        ("images/operator/Dockerfile", {"operator"}),
        ("images/ray-worker/Dockerfile", {"ray-worker"}),
        ("images/ray-base/Dockerfile", {"ray-base", "ray-worker"}),
        ("images/pause/pause.c", {"pause"}),
        ("images/pause/Dockerfile", {"pause"}),
    ],
)
def test_the_hash_changes_with_each_input_and_only_for_its_images(tree, change, changed):
    before = hashes(tree)
    path = tree / change
    path.write_text((path.read_text() if path.exists() else "") + "\n# changed\n")
    after = hashes(tree)
    assert {role for role in before if before[role] != after[role]} == changed


def test_the_hash_changes_with_the_build_arguments(tree):
    before = hashes(tree)
    assert hashes(tree, extras="pipeline,formats")["ray-worker"] != before["ray-worker"]
    assert hashes(tree, extras="pipeline,formats")["operator"] == before["operator"]
    registry = hashes(tree, local_bases=False)
    assert registry["operator"] != before["operator"] and registry["ray-worker"] != before["ray-worker"]
    other = hashes(tree, local_bases=False, python_image="python:3.11.99-slim-bookworm")
    assert other["operator"] != registry["operator"] and other["ray-worker"] == registry["ray-worker"]


def test_a_debian_recipe_change_rebuilds_everything_on_it(tree, monkeypatch):
    before = hashes(tree)
    monkeypatch.setattr(build_images, "DEBIAN_PACKAGES", (*build_images.DEBIAN_PACKAGES, "less"))
    after = hashes(tree)
    assert {role for role in before if before[role] != after[role]} == {
        "python-base",
        "ray-base",
        "operator",
        "ray-worker",
    }


def test_the_staged_context_holds_exactly_the_images_inputs(tree, tmp_path):
    package = tree / "operator" / "laion_operator"
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0")
    (package / "cli.py").chmod(0o600)
    image = build_images.plan(["operator"], testbed=True, local_bases=False, extras="pipeline", root=tree)["operator"]
    context = build_images.stage_context(image, tmp_path / "stage")
    staged = sorted(str(p.relative_to(context)) for p in context.rglob("*") if p.is_file())
    assert staged == [
        "images/operator/Dockerfile",
        "operator/laion_operator/__init__.py",
        "operator/laion_operator/cli.py",
        "operator/laion_operator/crd.yaml",
        "operator/pyproject.toml",
        "requirements.lock",
    ]
    assert (context / "operator/laion_operator/cli.py").stat().st_mode & 0o777 == 0o644


def write_tar(path: Path, files: dict[str, object]) -> Path:
    with tarfile.open(path, "w") as tar:
        for member, document in files.items():
            data = json.dumps(document).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_must_name_its_image(tmp_path):
    name = "docker.io/laion-operator/pause:0.1.0-dev.0123456789ab"

    def oci(ref: str) -> Path:
        index = {"schemaVersion": 2, "manifests": [{"annotations": {"org.opencontainers.image.ref.name": ref}}]}
        return write_tar(tmp_path / f"{len(list(tmp_path.iterdir()))}.tar", {"index.json": index})

    build_images.verify_archive(oci(name), name)  # buildah's: the full name
    build_images.verify_archive(oci("0.1.0-dev.0123456789ab"), name)  # a tag, for --base-name
    with pytest.raises(SystemExit):
        build_images.verify_archive(oci("docker.io/laion-operator/pause:other"), name)
    # an older Docker's `docker save`: familiar names, which containerd normalises
    legacy = write_tar(
        tmp_path / "legacy.tar", {"manifest.json": [{"RepoTags": ["laion-operator/pause:0.1.0-dev.0123456789ab"]}]}
    )
    build_images.verify_archive(legacy, name)
    assert build_images.docker_reference("localhost/x/y:1") == "localhost/x/y:1"
    assert build_images.docker_reference("registry.example.com/x:1") == "registry.example.com/x:1"


def test_buildahs_sizes_are_read():
    assert build_images.human_bytes("691 KB") == 691_000
    assert build_images.human_bytes("1.55 GB") == 1_550_000_000
    assert build_images.human_bytes(12) == 12


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_pause_sleeps_until_told_to_stop_and_exits_0(tmp_path, signo):
    binary = tmp_path / "pause"
    subprocess.run(
        ["gcc", *build_images.PAUSE_CFLAGS, "-o", str(binary), str(ROOT / "images" / "pause" / "pause.c")], check=True
    )
    proc = subprocess.Popen([str(binary)])
    time.sleep(0.2)
    assert proc.poll() is None
    proc.send_signal(signo)
    assert proc.wait(timeout=5) == 0
