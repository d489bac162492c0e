"""The trainer's own libraries, where only the training process sees them.

ComfyUI's Python keeps what ComfyUI and its other packs need: the pack's requirements.txt changes
none of it. The trainer's libraries (requirements-trainer.txt: diffusers, transformers, peft,
accelerate, bitsandbytes, onnx2torch at the tested versions) go into a folder of the pack,
`<pack>/trainer_env` (or FACE_CONSISTENCY_TRAINER_ENV), set up once by `face-consistency
setup-trainer`, i.e. `python <pack>/bootstrap.py setup-trainer` with ComfyUI's Python:

- `venv`: a virtualenv whose own site-packages come first and ComfyUI's after them (a .pth file
  runs `site.addsitedir` on each of ComfyUI's site folders), so torch, numpy, insightface and the
  rest are ComfyUI's and nothing large is downloaded twice. Not `--system-site-packages`: a venv
  made from a virtualenv's Python would see the base interpreter's packages, not ComfyUI's.
- `target`: where `venv` cannot be made (the embedded Python of portable Windows builds), the
  packages pip would add or change in ComfyUI's Python (a dry run's report) installed with
  `pip install --target --no-deps` into `site-packages/`; ComfyUI's Python runs the trainer with
  that folder first on sys.path (`bootstrap.py --site DIR`).

Both pin torch (and torchvision) to ComfyUI's installed versions, so pip never installs another.
`trainer_runtime()` is what a launch runs: the environment when it is set up, else this Python
when it has the trainer's libraries (a standalone `pip install`), else it refuses naming the setup
command. The environment's manifest, written last, says it is complete and what it was made for.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.files import atomic_write_json, atomic_write_text
from ..training_contract import libraries

PACK_DIR = Path(__file__).resolve().parent.parent
BOOTSTRAP = PACK_DIR / "bootstrap.py"
REQUIREMENTS = PACK_DIR / "requirements-trainer.txt"
ENV_VARIABLE = "FACE_CONSISTENCY_TRAINER_ENV"
MANIFEST = "trainer_env.json"
# the first file a setup writes: a folder holding it (and no manifest) is an unfinished setup to replace
MARKER = ".face_consistency_trainer_env"
PTH_FILE = "_face_consistency_comfyui.pth"
LAYOUTS = ("auto", "venv", "target")
# ComfyUI's builds of these are reused as they are, never replaced by the trainer's requirements
KEPT_FROM_COMFYUI = ("torch", "torchvision")
SETUP_DOC = "README, Install → The trainer's libraries"

Echo = Callable[[str], None]


class TrainerEnvironmentError(RuntimeError):
    """The trainer's libraries are not where a launch can use them, or their setup failed; the message says
    what to do."""


@dataclass(frozen=True)
class TrainerRuntime:
    """How a training process is started: `python [bootstrap.py --site DIR] ...`."""

    python: str
    site: Path | None  # the `target` layout's package folder, first on the trainer's sys.path
    description: str

    def command(self, *args: str) -> list[str]:
        head = [self.python, str(BOOTSTRAP)]
        if self.site is not None:
            head += ["--site", str(self.site)]
        return [*head, *args]


def env_dir(path: str | os.PathLike | None = None) -> Path:
    """The trainer environment's folder: `path`, else FACE_CONSISTENCY_TRAINER_ENV, else <pack>/trainer_env."""
    chosen = path or os.environ.get(ENV_VARIABLE) or PACK_DIR / "trainer_env"
    return Path(chosen).expanduser().absolute()


def setup_command(path: str | os.PathLike | None = None) -> str:
    """The command a user runs, with this Python, to set up the trainer environment."""
    argv = [sys.executable, str(BOOTSTRAP), "setup-trainer"]
    if path is not None:
        argv += ["--path", str(path)]
    return subprocess.list2cmdline(argv) if os.name == "nt" else shlex.join(argv)


def requirements_digest(requirements: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def python_version() -> str:
    """Major.minor: what compiled packages depend on."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _stale_reason(manifest: dict[str, Any], requirements: Path) -> str | None:
    """Why a set-up environment cannot run this pack's trainer from this Python, or None."""
    python = str(manifest.get("python", ""))
    if not python or not Path(python).is_file():
        return f"its Python {python or '(none recorded)'} is gone"
    # the environment (its prefix), not the interpreter: a venv's python links to its base's
    if manifest.get("base_prefix") != os.path.realpath(sys.prefix):
        return (
            f"it was made for the Python {manifest.get('base_python')} (in {manifest.get('base_prefix')}), "
            f"and ComfyUI now runs {sys.executable} (in {os.path.realpath(sys.prefix)})"
        )
    if manifest.get("python_version") != python_version():
        return f"it was made for Python {manifest.get('python_version')}, this is Python {python_version()}"
    if manifest.get("requirements_sha256") != requirements_digest(requirements):
        return f"{requirements.name} has changed since it was set up (the pack was updated)"
    return None


def trainer_runtime(path: str | os.PathLike | None = None, *, requirements: Path | None = None) -> TrainerRuntime:
    """What a launch runs the trainer with (see the module's docstring); raises TrainerEnvironmentError."""
    requirements = requirements or REQUIREMENTS
    folder = env_dir(path)
    named = folder if path or os.environ.get(ENV_VARIABLE) else None  # the setup must find the same folder
    manifest = read_manifest(folder)
    if manifest is not None:
        stale = _stale_reason(manifest, requirements)
        if stale is not None:
            raise TrainerEnvironmentError(
                f"the trainer environment in {folder} is out of date: {stale}. Set it up again, with ComfyUI's "
                f"Python: {setup_command(named)} ({SETUP_DOC})"
            )
        site_dir = manifest.get("site")
        return TrainerRuntime(
            str(manifest["python"]),
            Path(site_dir) if site_dir else None,
            f"the trainer environment in {folder} ({manifest.get('layout')})",
        )
    absent = libraries.missing()
    if not absent:
        return TrainerRuntime(sys.executable, None, f"this Python ({sys.executable})")
    unfinished = " (an earlier setup did not finish)" if (folder / MARKER).exists() else ""
    raise TrainerEnvironmentError(
        f"training needs {', '.join(absent)}, which this Python ({sys.executable}) does not have, and the "
        f"trainer environment is not set up in {folder}{unfinished}. Set it up once, with ComfyUI's Python: "
        f"{setup_command(named)} (it installs the trainer's libraries into that folder only and changes "
        f"nothing of ComfyUI's own packages; {SETUP_DOC})"
    )


# --- setting it up ---------------------------------------------------------------------------------


def comfyui_site_dirs() -> list[str]:
    """The site folders this Python imports from (ComfyUI's), in its order."""
    dirs = list(site.getsitepackages())
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(user_site):
        dirs.append(user_site)
    return [d for d in dirs if os.path.isdir(d)]


def kept_versions() -> dict[str, str]:
    """ComfyUI's versions of KEPT_FROM_COMFYUI, for a constraints file."""
    found = libraries.versions(KEPT_FROM_COMFYUI)
    return {name: info["version"] for name, info in found.items()}


def _write_constraints(path: Path) -> Path:
    kept = kept_versions()
    lines = ["# ComfyUI's own builds, reused by the trainer environment (never replaced)"]
    lines += [f"{name}=={version}" for name, version in kept.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _run(argv: Sequence[str], what: str) -> None:
    """Run a step with its output on this terminal (pip's own progress bars)."""
    code = subprocess.run(list(argv), check=False).returncode
    if code != 0:
        raise TrainerEnvironmentError(
            f"{what} failed (exit code {code}; pip's messages are above). Nothing of ComfyUI's own packages "
            "was changed. If this machine is offline, run the setup again once it is online, or fetch the "
            "wheels elsewhere (pip download -r requirements-trainer.txt -d wheels) and pass "
            "--no-index --find-links wheels"
        )


def _pip_options(index_url: str | None, find_links: Sequence[str], no_index: bool) -> list[str]:
    options = ["--index-url", index_url] if index_url else []
    for link in find_links:
        options += ["--find-links", str(link)]
    return options + (["--no-index"] if no_index else [])


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _make_venv(venv: Path, echo: Echo) -> Path | None:
    """A virtualenv with pip made by this Python; None where this Python cannot make one."""
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        reason = ((made.stderr or made.stdout).strip().splitlines() or ["no reason given"])[-1]
        echo(f"this Python cannot make a virtualenv ({reason}); installing into a package folder instead")
        shutil.rmtree(venv, ignore_errors=True)
        return None
    python = _venv_python(venv)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # after the venv's own packages, ComfyUI's: .pth lines starting with `import` are run at start-up
    lines = [f"import site; site.addsitedir({folder!r})" for folder in comfyui_site_dirs()]
    atomic_write_text(Path(purelib) / PTH_FILE, "\n".join(lines) + "\n")
    return python


def _changes_in_this_python(requirements: Path, constraints: Path, pip_options: Sequence[str], work: Path) -> list[str]:
    """`name==version` of what pip would add or change in this Python for `requirements` (its dry run)."""
    report = work / "pip-report.json"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(requirements),
            "-c",
            str(constraints),
            *pip_options,
        ],
        "pip's dry run of the trainer's libraries",
    )
    items = json.loads(report.read_text(encoding="utf-8")).get("install", [])
    return [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in items]


def probe(runtime: TrainerRuntime) -> dict[str, dict[str, str]]:
    """Import the trainer's libraries with `runtime` and return their versions and folders."""
    done = subprocess.run(runtime.command("setup-trainer", "--libraries"), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TrainerEnvironmentError(
            f"the trainer's libraries were installed but do not import with {runtime.description}:\n"
            f"{done.stderr.strip()[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clear(folder: Path) -> None:
    """Remove an earlier environment (or an unfinished setup) in `folder`; refuse any other folder."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise TrainerEnvironmentError(f"{folder} is a file, not a trainer environment: choose another --path")
    ours = (folder / MANIFEST).exists() or (folder / MARKER).exists()
    if not ours and any(folder.iterdir()):
        raise TrainerEnvironmentError(
            f"{folder} is not empty and holds no trainer environment: choose an empty or new folder (--path)"
        )
    (folder / MANIFEST).unlink(missing_ok=True)  # first: a setup cut short from here on reads as unfinished
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def set_up(
    path: str | os.PathLike | None = None,
    *,
    layout: str = "auto",
    index_url: str | None = None,
    find_links: Sequence[str] = (),
    no_index: bool = False,
    requirements: Path = REQUIREMENTS,
    echo: Echo = print,
) -> dict[str, Any]:
    """Create (or replace) the trainer environment; returns its manifest."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    folder = env_dir(path)
    pip_options = _pip_options(index_url, find_links, no_index)
    kept = ", ".join(f"{name} {version}" for name, version in kept_versions().items()) or "none installed"
    echo(
        f"Setting up the trainer environment in {folder}\n"
        f"  for the Python {sys.executable} (Python {platform.python_version()}; its torch is reused: {kept})\n"
        f"  with {requirements}; ComfyUI's own packages are not changed"
    )
    _clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, "a face-consistency trainer environment (setup-trainer)\n")
    constraints = _write_constraints(folder / "constraints-from-comfyui.txt")
    python: Path | None = None
    if layout in ("auto", "venv"):
        echo("[1/3] making a virtualenv that sees ComfyUI's packages")
        python = _make_venv(folder / "venv", echo)
        if python is None and layout == "venv":
            raise TrainerEnvironmentError("--layout venv: this Python cannot make a virtualenv; use --layout target")
    if python is not None:
        echo("[2/3] installing the trainer's libraries into it (pip's progress below)")
        # pip inside the venv sees ComfyUI's packages (the .pth) and installs only what they lack
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
                "-c",
                str(constraints),
                *pip_options,
            ],
            "installing the trainer's libraries",
        )
        runtime = TrainerRuntime(str(python), None, f"the trainer environment in {folder} (venv)")
    else:
        site_dir = folder / "site-packages"
        echo("[1/3] asking pip what ComfyUI's Python lacks for the trainer (a dry run: nothing is installed there)")
        with tempfile.TemporaryDirectory(dir=folder) as work:
            specs = _changes_in_this_python(requirements, constraints, pip_options, Path(work))
        echo(f"[2/3] installing {len(specs)} packages into {site_dir} (pip's progress below)")
        if specs:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "--target",
                    str(site_dir),
                    *specs,
                    *pip_options,
                ],
                "installing the trainer's libraries",
            )
        site_dir.mkdir(exist_ok=True)
        runtime = TrainerRuntime(sys.executable, site_dir, f"the trainer environment in {folder} (target)")
    echo("[3/3] checking that the trainer's libraries import")
    found = probe(runtime)
    manifest = {
        "layout": "venv" if runtime.site is None else "target",
        "python": runtime.python,
        "site": str(runtime.site) if runtime.site is not None else None,
        "base_python": sys.executable,
        "base_prefix": os.path.realpath(sys.prefix),
        "python_version": python_version(),
        "requirements": str(requirements),
        "requirements_sha256": requirements_digest(requirements),
        "libraries": found,
        "created": time.time(),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    echo("The trainer environment is ready; training jobs launched from ComfyUI run with:")
    echo("\n".join(f"  {line}" for line in libraries.describe(found)))
    return manifest


def dry_run(
    *,
    index_url: str | None = None,
    find_links: Sequence[str] = (),
    no_index: bool = False,
    requirements: Path = REQUIREMENTS,
    echo: Echo = print,
) -> None:
    """Show what the trainer environment would hold: pip's dry run against this Python's packages."""
    echo(
        f"What the trainer environment would hold besides this Python's packages ({sys.executable}): pip's "
        f"`Would install` line below. It is a dry run; the setup puts them in a folder of their own, never here."
    )
    with tempfile.TemporaryDirectory() as work:
        constraints = _write_constraints(Path(work) / "constraints.txt")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
                "-c",
                str(constraints),
                *_pip_options(index_url, find_links, no_index),
            ],
            "pip's dry run of the trainer's libraries",
        )
