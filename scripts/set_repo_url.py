"""The project's repository URL, kept in one place (pyproject.toml's [project.urls] Repository), and everything
derived from it: each notebook's Colab set-up cell and the "Open in Colab" badges of the README and notebooks.

    python scripts/set_repo_url.py https://github.com/OWNER/NAME   # publish: set the URL, rewrite cells + badges
    python scripts/set_repo_url.py                                 # rewrite them from pyproject.toml's URL
    python scripts/set_repo_url.py --check                         # exit 1 if anything is out of date
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "run.ipynb"]
URL_LINE = re.compile(r'^Repository = "([^"]*)"$', re.M)
BADGE = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\([^)]*\)")
MARKER = "# Set-up (the same in every notebook"

BOOTSTRAP = '''# Set-up (the same in every notebook; scripts/set_repo_url.py writes it): makes `simclr_lib` importable.
# In Colab, when it is not, it clones the project (REPO_URL, or the environment variable SIMCLR_REPO_URL) and
# installs it; elsewhere it uses the project folder this notebook is in (install it once: `make lab`).
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = os.environ.get("SIMCLR_REPO_URL", "{url}")
project = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "simclr_lib").is_dir()), None)
if project is None and importlib.util.find_spec("simclr_lib") is None:
    if "google.colab" not in sys.modules:
        raise ImportError("simclr_lib is not installed: run `make lab` (or `pip install -e .`) in the project folder")
    if "/OWNER/" in REPO_URL:
        raise RuntimeError("this copy does not know its repository: set SIMCLR_REPO_URL to the project's git URL")
    project = Path.cwd() / Path(REPO_URL.rstrip("/")).name.removesuffix(".git")
    if not project.is_dir():
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO_URL, str(project)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", str(project)], check=True)
if project is not None:
    sys.path.insert(0, str(project))  # importable at once, without restarting the kernel'''


def repo_url() -> str:
    """The URL in pyproject.toml."""
    match = URL_LINE.search((ROOT / "pyproject.toml").read_text())
    if not match:
        raise SystemExit("pyproject.toml has no [project.urls] Repository line")
    return match.group(1)


def badge(url: str, notebook: Path) -> str:
    """The "Open in Colab" badge of a notebook of the GitHub repository `url`."""
    repo = re.sub(r"^https?://github\.com/", "", url.rstrip("/")).removesuffix(".git")
    target = f"https://colab.research.google.com/github/{repo}/blob/main/{notebook.relative_to(ROOT).as_posix()}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({target})"


def bootstrap_source(url: str) -> str:
    """The set-up cell's source for `url`."""
    return BOOTSTRAP.format(url=url)


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def updated_notebook(path: Path, url: str) -> dict:
    """The notebook with its set-up cell first among the code cells and its badge atop the first markdown cell."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if not "".join(c["source"]).startswith(MARKER)]
    setup = {"cell_type": "code", "execution_count": None, "id": "setup", "metadata": {}, "outputs": [],
             "source": _lines(bootstrap_source(url))}
    first_code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    cells.insert(first_code, setup)
    title = next(c for c in cells if c["cell_type"] == "markdown")
    text = BADGE.sub("", "".join(title["source"])).lstrip("\n")
    title["source"] = _lines(badge(url, path) + "\n\n" + text)
    nb["cells"] = cells
    return nb


def updated_readme(url: str) -> str:
    """The README with each notebook's badge before its link in the notebook table."""
    text = BADGE.sub("", (ROOT / "README.md").read_text()).replace("|  [`", "| [`")
    for path in NOTEBOOKS:
        link = re.search(rf"\| (\[`[^`]*`\]\({re.escape(path.relative_to(ROOT).as_posix())}\))", text)
        if link:
            text = text.replace(link.group(0), f"| {badge(url, path)} {link.group(1)}", 1)
    return text


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    url = args[0] if args else repo_url()
    if args:
        pyproject = ROOT / "pyproject.toml"
        pyproject.write_text(URL_LINE.sub(f'Repository = "{url}"', pyproject.read_text()))
    stale = []
    for path in NOTEBOOKS:
        text = json.dumps(updated_notebook(path, url), indent=1, ensure_ascii=False) + "\n"
        if json.loads(path.read_text()) != json.loads(text):
            stale.append(path)
            if not check:
                path.write_text(text)
    readme = updated_readme(url)
    if readme != (ROOT / "README.md").read_text():
        stale.append(ROOT / "README.md")
        if not check:
            (ROOT / "README.md").write_text(readme)
    for path in stale:
        print(f"{'out of date' if check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
