"""pyproject.toml's Comfy Registry metadata, against what comfy-cli's registry parser reads
(comfy_cli/registry/config_parser.py, `extract_node_configuration`, and its types), and the
.comfyignore that `comfy node publish` packs the archive with (comfy_cli/file_utils.py, `zip_files`).

The parser never fails: a field it does not know is ignored and a malformed one becomes empty,
with at most a warning. So each rule it applies is checked here, where a mistake fails."""

from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pathspec
import pytest
from face_consistency.common.files import tomllib

REPO = Path(__file__).resolve().parents[2]

# [tool.comfy]: every key the parser reads (PublisherId, DisplayName, Icon, Models, includes, Banner,
# web; requires-comfyui for the supported ComfyUI versions). Any other key is silently dropped.
TOOL_COMFY_KEYS = {"PublisherId", "DisplayName", "Icon", "Models", "includes", "Banner", "web", "requires-comfyui"}
FRONTEND_PACKAGE = "comfyui-frontend-package"  # its dependency line carries the supported frontend versions
# each comma-separated part of requires-comfyui and of the frontend line: [operator]major.minor.patch[-suffix]
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")  # after "Operating System :: "
ACCELERATORS = {
    "GPU :: NVIDIA CUDA",
    "GPU :: AMD ROCm",
    "GPU :: Intel Arc",
    "NPU :: Huawei Ascend",
    "GPU :: Apple Metal",
}  # after "Environment :: "; one unknown value drops them all
# the registry's node id (project.name): https://docs.comfy.org/registry/specifications
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _version_ok(spec: str) -> bool:
    return all(VERSION_PART.match(part.strip()) for part in spec.split(","))


def test_tool_comfy_has_every_field_the_registry_shows_and_no_key_it_ignores(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert set(comfy) <= TOOL_COMFY_KEYS, set(comfy) - TOOL_COMFY_KEYS
    assert comfy["PublisherId"].strip() and comfy["DisplayName"].strip()
    assert all(isinstance(d, str) and (REPO / d).is_dir() for d in comfy["includes"])
    # ComfyUI reads these from the pack folder; includes keep them in the archive whatever .comfyignore says
    assert {"web", "example_workflows"} <= set(comfy["includes"])


def test_icon_is_a_url_to_the_repositorys_own_icon_file(pyproject):
    icon = pyproject["tool"]["comfy"]["Icon"]
    repository = urlparse(pyproject["project"]["urls"]["Repository"])
    url = urlparse(icon)
    assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com", icon
    owner, name, branch, path = url.path.lstrip("/").split("/", 3)
    assert f"{owner}/{name}" == repository.path.strip("/") and branch == "main", icon
    icon_file = REPO / path
    assert icon_file.is_file(), f"{icon} names {path}, which is not in the repository"
    root = ET.parse(icon_file).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == root.get("height")  # the registry shows icons square


def test_supported_comfyui_and_frontend_versions_parse_and_are_the_ones_ci_runs(pyproject):
    requires_comfyui = pyproject["tool"]["comfy"]["requires-comfyui"]
    assert _version_ok(requires_comfyui) and requires_comfyui == ">=0.3.64"
    frontend = [d for d in pyproject["project"]["dependencies"] if d.startswith(FRONTEND_PACKAGE)]
    assert len(frontend) == 1
    spec = frontend[0].removeprefix(FRONTEND_PACKAGE)
    assert _version_ok(spec) and spec == ">=1.27.10"  # 1.27.10: pinned by ComfyUI 0.3.64; CI also runs the newest


def test_comfyui_floor_is_the_comfyui_the_end_to_end_tier_runs(pyproject):
    comfyui = os.environ.get("COMFYUI_DIR")
    version_file = Path(comfyui) / "comfyui_version.py" if comfyui else None
    if version_file is None or not version_file.is_file():
        pytest.skip("COMFYUI_DIR (the real-ComfyUI tier) is not set")
    version = re.search(r'__version__ = "([^"]+)"', version_file.read_text()).group(1)
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == f">={version}"


def test_os_and_accelerator_classifiers_are_ones_the_registry_accepts(pyproject):
    classifiers = pyproject["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems), systems
    assert accelerators and set(accelerators) <= ACCELERATORS, accelerators


def test_project_fields_the_registry_reads(pyproject):
    project = pyproject["project"]
    assert len(project["name"]) < 100 and NODE_ID.match(project["name"]), project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"].strip() and project["urls"]["Repository"].startswith("https://")
    license_ = project["license"]
    assert isinstance(license_, str) or {"file", "text"} & set(license_)


def _archive_ignores(comfy: dict) -> Callable[[str], bool]:
    """What `zip_files` leaves out: .comfyignore's gitwildmatch patterns, except under the includes."""
    lines = (REPO / ".comfyignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    with warnings.catch_warnings():  # comfy-cli still names the pattern style "gitwildmatch"
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
    includes = [i.strip("/") for i in comfy["includes"]]

    def ignored(rel_path: str) -> bool:
        if any(rel_path == i or rel_path.startswith(i + "/") for i in includes):
            return False
        return spec.match_file(rel_path)

    return ignored


def test_comfyignore_keeps_tests_benchmarks_and_ci_out_and_the_pack_in(pyproject):
    ignored = _archive_ignores(pyproject["tool"]["comfy"])
    files = [
        p.relative_to(REPO).as_posix()
        for p in REPO.rglob("*")
        if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts
    ]
    for folder in ("tests", "benchmarks", ".ci"):
        inside = [f for f in files if f.startswith(folder + "/")]
        assert inside and all(ignored(f) for f in inside), folder
    for folder in ("web", "example_workflows", "faceid", "nodes", "trainer", "docs"):
        inside = [f for f in files if f.startswith(folder + "/")]
        assert inside and not any(ignored(f) for f in inside), folder
    for kept in ("__init__.py", "pyproject.toml", "requirements.txt", "requirements-trainer.txt", "README.md"):
        assert not ignored(kept), kept
