"""The README's newcomer commands must stay true: CI runs exactly the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
  readme_blocks = _bash_blocks((ROOT / "README.md").read_text())
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  marker = ci_lines.index("# README-TEST-COMMAND")
  ci_command = ci_lines[marker + 1].strip()
  assert ci_command in readme_blocks, (
    f".ci/run runs {ci_command!r}, which is not one of the README's commands {readme_blocks}"
  )
  assert "pytest" in ci_command


def test_readme_main_command_names_existing_entry_point():
  readme_blocks = _bash_blocks((ROOT / "README.md").read_text())
  main = readme_blocks[0]
  script = re.search(r"python ([\w/]+\.py)", main)
  assert script, f"the README's first command runs no script: {main!r}"
  assert (ROOT / script.group(1)).is_file(), f"{script.group(1)} named by the README is missing"
