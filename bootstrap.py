"""Run the pack's command line from its folder, whatever that folder is called.

ComfyUI packs live in `custom_nodes/<any name>/` (often with hyphens) and need not be
pip-installed. The trainer child process is started as `[python, <pack>/bootstrap.py, "train", ...]`
(python: the trainer environment's, or ComfyUI's own; training_jobs/trainer_env.py): this file
loads its own folder as the package `face_consistency` and hands the arguments to
`face_consistency.cli.main`. `bootstrap.py --site DIR <command> ...` first puts DIR ahead of
everything on sys.path: the trainer environment's package folder, where it is one (`target`
layout; a `._pth` file makes the embedded Python of portable builds ignore PYTHONPATH).
`python <pack>/bootstrap.py setup-trainer` sets that environment up.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "face_consistency"
PACK_DIR = Path(__file__).resolve().parent


def load_pack(pack_dir: Path = PACK_DIR, name: str = PACKAGE_NAME) -> ModuleType:
    """Import `pack_dir` as package `name` (reusing it when already imported from there)."""
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "")).resolve().parent == pack_dir:
        return existing
    spec = importlib.util.spec_from_file_location(
        name, pack_dir / "__init__.py", submodule_search_locations=[str(pack_dir)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the face-consistency pack from {pack_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--site"] and len(argv) > 1:
        sys.path.insert(0, argv[1])
        argv = argv[2:]
    load_pack()
    cli = importlib.import_module(f"{PACKAGE_NAME}.cli")
    sys.exit(cli.main(argv))
