"""One import root: the repo's folders install as fedscore.* and nothing else lands in site-packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"fedscore": "fedscore", "server": "fedscore.server", "clients": "fedscore.clients",
          "shared": "fedscore.shared", "proto": "fedscore.proto"}


def test_every_package_folder_is_listed_under_fedscore() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join([name, *relative]))
    assert set(setuptools["packages"]) == on_disk
    assert {v: k for k, v in setuptools["package-dir"].items()} == MAPPED


@pytest.mark.slow
def test_only_fedscore_imports_from_outside_the_checkout(tmp_path: Path) -> None:
    """From another folder (no checkout on sys.path): server/clients/shared fail, fedscore and its parts load."""
    probe = ("import importlib\n"
             "for name in ('server', 'clients', 'shared', 'proto'):\n"
             "    try:\n        importlib.import_module(name)\n        print('importable', name)\n"
             "    except ImportError:\n        pass\n"
             "import fedscore.server.coordinator, fedscore.clients.parties, fedscore.shared.privacy, fedscore.proto\n"
             "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
    help_text = subprocess.run([str(Path(sys.executable).parent / "fedscore"), "--help"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout
    assert "federate" in help_text and "serve" in help_text
