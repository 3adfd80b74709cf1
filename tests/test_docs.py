"""Text that must agree with the code and the result files: the README's and docs' numbers, the notebooks' Colab
set-up cells and badges."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "run.ipynb"]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_readme_and_docs_numbers_equal_the_committed_result_files():
    proc = script("sync_numbers.py", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\nrun: python scripts/sync_numbers.py"


def test_a_number_changed_by_hand_is_caught(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import sync_numbers

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- numbers:results-table -->\n(.*?)<!-- /numbers -->", readme, re.S).group(1)
    assert re.search(r"\d+\.\d\d %", block), "the results table shows accuracies"
    edited = readme.replace(block, re.sub(r"(\d+)\.(\d)\d %", r"\1.\g<2>9 %", block, count=1))
    assert sync_numbers.synced(edited) != edited and sync_numbers.synced(readme) == readme


def test_notebook_text_quotes_no_measured_accuracy():
    """Accuracies shown to learners are printed from docs/results by code cells, never typed into markdown."""
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                assert not re.search(r"\d+\.\d+ ?%", text), f"{path.name}: a typed accuracy in {text[:80]!r}"


def test_every_notebook_has_the_set_up_cell_and_badge_of_the_repository_url():
    proc = script("set_repo_url.py", "--check")
    assert proc.returncode == 0, proc.stdout + "\nrun: python scripts/set_repo_url.py"
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert "SIMCLR_REPO_URL" in "".join(first_code["source"]), path.name
        assert "colab-badge.svg" in "".join(cells[0]["source"]), path.name
