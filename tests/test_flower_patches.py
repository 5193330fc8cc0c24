"""Every private part of flwr that fedscore patches or leans on still exists in the installed flwr
(fedscore/flower/patches.py): an upgrade fails here, in seconds, instead of silently losing the speed-up."""

from __future__ import annotations

import importlib
import inspect

import flwr
import pytest

from fedscore.flower import patches


def test_installed_flwr_is_the_patched_version() -> None:
    assert flwr.__version__ == patches.PATCHED_FLWR
    assert patches.patchable()


@pytest.mark.parametrize(("module", "attribute"), patches.PATCHED)
def test_every_patched_attribute_exists(module: str, attribute: str) -> None:
    assert hasattr(importlib.import_module(module), attribute), f"{module}.{attribute} is gone"


def test_flower_still_starts_the_shadowed_commands_by_name() -> None:
    """The local launcher shadows these commands on PATH; Flower must still start them by exactly these names."""
    for command, module in patches.COMMAND_STARTED_IN.items():
        assert f'"{command}"' in inspect.getsource(importlib.import_module(module)) or command in str(
            getattr(importlib.import_module(module), "TASK_TYPE_TO_COMMAND", {}).values()), command
    assert set(patches.COMMAND_STARTED_IN) == set(patches.SHADOWED_COMMANDS)


def test_flower_error_code_and_refusal_markers() -> None:
    from flwr.common.constant import ErrorCode

    assert patches.node_unavailable() == ErrorCode.NODE_UNAVAILABLE
    catalog = inspect.getsource(importlib.import_module("flwr.supercore.error.catalog"))
    assert all(marker in catalog for marker in patches.REFUSED_MARKERS)


def test_a_foreign_flwr_version_leaves_flower_as_shipped(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.supernode import start_client_internal

    before = start_client_internal.time
    monkeypatch.setattr(flwr, "__version__", "0.0.0")
    assert not patches.shorten_idle_waits(0.1)
    assert start_client_internal.time is before
    assert "left as shipped" in capsys.readouterr().err


def test_task_argv_matches_flowers_subprocess_executor() -> None:
    """The fork server must start exactly what Flower's SubprocessExecutor would: the same argv builder."""
    from flwr.supercore.superexec.executor import subprocess_executor

    source = inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    for piece in ("TASK_TYPE_TO_COMMAND", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG", "--token", "--insecure",
                  "--root-certificates", "--parent-pid", "--allow-runtime-dependency-installation"):
        assert piece in source, piece
