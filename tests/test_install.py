"""`pip install .` gives the library alone: jax, jaxlib, numpy and chex, nothing of the
harness (flax, optax, orbax, ml-collections, tqdm, matplotlib, scikit-learn).

The check builds the wheel, installs it with `pip install --no-deps` into a fresh
virtual environment (no system site-packages), and gives that environment exactly the
distributions the wheel's metadata requires, transitively, linked from the
environment running the tests, so it needs no network and takes seconds. `pip check`
then confirms that they satisfy the wheel's requirements, and `import lossjax` runs
there, where the harness's packages cannot even be found.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import shutil
import subprocess
import sys
import venv
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Import names of the `experiments` and `test` extras' packages.
HARNESS = ("flax", "optax", "orbax", "ml_collections", "tqdm", "matplotlib",
           "sklearn", "torch", "pytest")


def _requirements(requires, extra=""):
    env = default_environment() | {"extra": extra}
    for line in requires or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            yield req


def _closure(requires) -> dict[str, md.Distribution]:
    """The installed distributions that `requires` needs, transitively."""
    found: dict[str, md.Distribution] = {}
    todo = list(_requirements(requires))
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist = md.distribution(req.name)
        todo += _requirements(dist.requires, *req.extras)
    return found


def _link(dist: md.Distribution, site: pathlib.Path) -> None:
    """Links the top-level entries of an installed distribution into `site`."""
    source = pathlib.Path(dist.locate_file(""))
    for top in sorted({f.parts[0] for f in dist.files or () if f.parts[0] != ".."}):
        target = site / top
        if not target.exists() and (source / top).exists():
            target.symlink_to(source / top)


def _run(*args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pip_install_gives_the_library_without_the_harness(tmp_path):
    # Build from a copy of what the wheel needs (no build/ or egg-info in the tree).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lossjax", src / "lossjax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(src))
    [wheel] = (tmp_path / "wheels").glob("lossjax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        metadata = z.read(next(n for n in z.namelist()
                               if n.endswith(".dist-info/METADATA"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lossjax"}, tops
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    needed = {r.name.lower() for r in _requirements(requires)}
    assert needed == {"jax", "jaxlib", "chex", "numpy"}, needed

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip runs from outside, with --python
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run(*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel))
    [site] = env_dir.glob("lib/python*/site-packages")
    for dist in _closure(requires).values():
        _link(dist, site)
    _run(*pip, "check")

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["JAX_PLATFORMS"] = "cpu"
    script = (
        "import importlib.util, sys\n"
        "import lossjax\n"
        "assert lossjax.cross_entropy is lossjax.get('cross_entropy')\n"
        f"harness = {HARNESS!r}\n"
        "print(sorted(set(harness) & {m.split('.')[0] for m in sys.modules}))\n"
        "print([h for h in harness if importlib.util.find_spec(h)])\n")
    imported, findable = _run(str(python), "-c", script, cwd=tmp_path,
                              env=env).splitlines()[-2:]
    assert imported == "[]", imported
    # The fresh environment has no harness package at all: a hidden import of one
    # would have failed above.
    assert findable == "[]", findable
