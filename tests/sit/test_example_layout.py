"""examples/sit's layout: the scripts a user runs at the top level, shared code in packages, no script
importing another script (so each one can be read, copied and run on its own)."""
from __future__ import annotations

import ast
from pathlib import Path

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
SCRIPTS = {p.stem for p in SIT_DIR.glob("*.py")}
PACKAGES = {p.name for p in SIT_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module that ``path`` imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script() -> None:
    for script in sorted(SCRIPTS):
        others = imported_modules(SIT_DIR / f"{script}.py") & (SCRIPTS - {script})
        assert not others, f"{script}.py imports the script(s) {sorted(others)}: move the shared code to a package"


def test_packages_import_no_script() -> None:
    for package in sorted(PACKAGES):
        for module in sorted((SIT_DIR / package).rglob("*.py")):
            scripts = imported_modules(module) & SCRIPTS
            assert not scripts, f"{module.relative_to(SIT_DIR)} imports the script(s) {sorted(scripts)}"


def test_every_top_level_module_is_a_script() -> None:
    for script in sorted(SCRIPTS):
        tree = ast.parse((SIT_DIR / f"{script}.py").read_text())
        mains = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert mains, f"{script}.py has no `if __name__ == '__main__':` block: support code belongs in a package"


def test_the_readme_names_every_script() -> None:
    readme = (SIT_DIR / "README.md").read_text()
    missing = [s for s in sorted(SCRIPTS) if f"{s}.py" not in readme]
    assert not missing, f"examples/sit/README.md does not say what {missing} are for"


def test_the_docs_name_every_module_of_every_package() -> None:
    """docs/sit.md's package table is the map of the example: a module missing from it is a module nobody finds."""
    docs = (SIT_DIR.parents[1] / "docs" / "sit.md").read_text()
    for package in sorted(PACKAGES):
        row = next((line for line in docs.splitlines() if line.startswith(f"| `{package}/` |")), None)
        assert row is not None, f"docs/sit.md has no row for the package {package}/"
        modules = [p.name for p in (SIT_DIR / package).glob("*.py") if p.name != "__init__.py"]
        missing = [m for m in sorted(modules) if f"`{m}`" not in row]
        assert not missing, f"docs/sit.md's row of {package}/ does not name {missing}"


MAX_FILE_LINES = 550  # every example file, so that each reads in one sitting
MAX_MAIN_LINES = 110  # train.py's main(): the loop stays in plain sight, the machinery lives in the packages


def test_every_example_file_stays_short() -> None:
    long = {str(path.relative_to(SIT_DIR)): n for path in SIT_DIR.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"over {MAX_FILE_LINES} lines: {long}; move machinery into a package module"


def test_train_main_stays_short() -> None:
    tree = ast.parse((SIT_DIR / "train.py").read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= MAX_MAIN_LINES
