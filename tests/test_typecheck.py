"""The package type-checks: mypy over trioproxy/ with pyproject.toml's [tool.mypy] (strict),
as ``mypy`` run from the repository's root checks it. Its cache is the repository's
.mypy_cache (ignored by git): a clean clone's first run checks everything (about 7 s),
later ones only what changed."""

from __future__ import annotations

import sys

from mypy import api

from .conftest import ROOT


def test_package_type_checks() -> None:
    # mypy raises the interpreter's recursion limit and leaves it so: restored, or the
    # tests after this one (too-deep JSON refused) would run under another limit
    limit = sys.getrecursionlimit()
    try:
        # paths from the root, not the working directory: pytest may run from elsewhere
        stdout, stderr, status = api.run(
            [
                "--config-file",
                str(ROOT / "pyproject.toml"),
                "--cache-dir",
                str(ROOT / ".mypy_cache"),
                str(ROOT / "trioproxy"),
            ]
        )
    finally:
        sys.setrecursionlimit(limit)
    assert status == 0, f"mypy found errors:\n{stdout}{stderr}"
