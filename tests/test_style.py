"""The house rules that can be measured: one formatter configuration applied to the whole tree, short
modules and functions, and every file the code or the docs cite present in the repository."""

import ast
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATTED = ["bond_jax", "tests", "bench", "configs", "setup.py"]


def test_the_tree_is_formatted_with_the_one_yapf_configuration():
  proc = subprocess.run([sys.executable, "-m", "yapf", "--diff", "-r", *FORMATTED], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and not proc.stdout, f"run `yapf -i -r {' '.join(FORMATTED)}`:\n{proc.stdout[:3000]}"


def test_modules_and_functions_stay_short():
  long = []
  for path in sorted((REPO / "bond_jax").rglob("*.py")):
    source = path.read_text()
    if len(source.splitlines()) > 500:
      long.append(f"{path.relative_to(REPO)}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
        long.append(f"{path.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
  assert not long, long


CITED = re.compile(r"\b((?:bond_jax|docs|configs|bench|launch|tests)/[\w/]+\.(?:py|md|sh|sbatch))\b")


def test_every_cited_file_exists():
  sources = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "bond_jax").rglob("*.py")]
  missing = sorted({
      f"{path.relative_to(REPO)} cites {cited}" for path in sources
      for cited in CITED.findall(path.read_text()) if not (REPO / cited).exists()
  })
  assert not missing, missing
  assert not [p for p in sources if re.search(r"\.\./shared|BOND_MATH\.md|DESIGN\.md", p.read_text())]
