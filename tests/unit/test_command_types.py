"""The typed forms of ``Storage.execute`` (:mod:`fleece.command_types`).

Checked twice: mypy (``make lint``, strict, with ``warn_unused_ignores``) checks the
``assert_type`` lines and that each ``type: ignore`` below is needed, i.e. that a misspelt key, a
wrong enum value and a missing required key are errors for an annotated argument dictionary;
pytest runs the same calls against a real ``Storage`` (null-co disk, unix NBD socket) and checks
that the values match the declared types: every ``BlockJobInfo`` key is present with its type, and
each ``TypedDict``'s keys are the command's schema keys (no typo in either).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, assert_type, get_args, get_origin

import pytest

from fleece.command_types import (
    BlockdevAddArgs,
    BlockdevBackupArgs,
    BlockJobInfo,
    DeviceAddArgs,
    DriveBackupArgs,
    NbdServerAddArgs,
    NbdServerStartArgs,
)
from fleece.storage import Storage

TYPED: dict[str, Any] = {
    "device_add": DeviceAddArgs,
    "drive-backup": DriveBackupArgs,
    "blockdev-backup": BlockdevBackupArgs,
    "nbd-server-start": NbdServerStartArgs,
    "nbd-server-add": NbdServerAddArgs,
}


def test_typed_calls_run_and_return_what_they_declare(tmp_path: Path) -> None:
    disk: BlockdevAddArgs = {"driver": "null-co", "node-name": "disk0", "size": 1 << 20,
                             "read-zeroes": True}
    plug: DeviceAddArgs = {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"}
    backup: DriveBackupArgs = {"device": "virtio0", "sync": "none", "format": "qcow2",
                               "target": str(tmp_path / "pit.qcow2"), "target-id": "pit0"}
    start: NbdServerStartArgs = {"addr": {"type": "unix",
                                          "data": {"path": str(tmp_path / "nbd.sock")}}}
    export: NbdServerAddArgs = {"device": "pit0"}
    with Storage() as storage:
        assert_type(storage.execute("blockdev-add", disk), dict[str, Any])
        assert storage.execute("device_add", plug) == {}
        assert storage.execute("drive-backup", backup) == {}
        assert storage.execute("nbd-server-start", start) == {}
        assert storage.execute("nbd-server-add", export) == {}
        jobs = storage.execute("query-block-jobs")
        assert_type(jobs, list[BlockJobInfo])
        (job,) = jobs
        assert job["device"] == "virtio0" and job["type"] == "backup"
        hints = typing.get_type_hints(BlockJobInfo)
        for key in BlockJobInfo.__required_keys__:
            want = hints[key]
            base = get_origin(want) or want
            if base is typing.Literal:
                assert job[key] in get_args(want), key  # type: ignore[literal-required]
            else:
                assert isinstance(job[key], base), key  # type: ignore[literal-required]
        assert set(job) <= set(hints)


def test_annotated_arguments_are_checked_by_mypy() -> None:
    # Each ignore below is an error mypy reports (strict mode fails on an unused ignore).
    typo: NbdServerAddArgs = {"device": "pit0", "writeable": False}  # type: ignore[typeddict-unknown-key]
    mode: DriveBackupArgs = {"device": "v", "sync": "nope", "target": "t"}  # type: ignore[typeddict-item]
    missing: DriveBackupArgs = {"device": "v", "sync": "none"}  # type: ignore[typeddict-item]
    assert typo and mode and missing


@pytest.mark.parametrize("name", sorted(TYPED))
def test_typed_keys_are_the_schema_keys(name: str) -> None:
    with Storage() as storage:
        schema = storage.schema(name)
    assert schema is not None
    declared = {key.lstrip("*") for key in schema}
    required = {key for key in schema if not key.startswith("*")}
    typed = TYPED[name]
    assert set(typed.__annotations__) | set(typed.__required_keys__) | set(
        typed.__optional_keys__) == declared
    assert set(typed.__required_keys__) == required
