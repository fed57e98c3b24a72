"""What a user reads never points at files a user does not have: this repository's
scripts/, design notes or the project's shared/ folder. Covers the docs, the README, the
examples and everything in the package (error texts included: they are user-facing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_THE_USERS = re.compile(r"DESIGN\.md|\bscripts/|\bshared/")
#: Known offenders in files another helper owns, reported to the lead; each entry is removed
#: as soon as its file is fixed (the test then guards it too).
REPORTED_ELSEWHERE = {
    "dspy_infra/backends/docker.py",  # an error text citing scripts/engines.sh (services helper)
    "dspy_infra/services/catalog.py",  # a comment citing DESIGN.md (services helper; fixed there)
}


def _user_facing() -> list[Path]:
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").glob("*.py")),
    ]
    files += sorted(p for p in (ROOT / "dspy_infra").rglob("*.py") if "_gen" not in p.parts)
    return files


def test_no_user_facing_file_points_at_files_users_do_not_have() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _user_facing()
        if str(path.relative_to(ROOT)) not in REPORTED_ELSEWHERE
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NOT_THE_USERS.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_readme_links_the_first_hour_and_keeps_its_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/first-hour.md)" in readme
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
