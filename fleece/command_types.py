"""Typed arguments and results of the common QMP commands, for users of mypy.

:meth:`fleece.storage.Storage.execute` is overloaded on these: a command name given as a literal
with arguments of the matching ``TypedDict`` returns the typed result (``query-block-jobs``
returns ``list[BlockJobInfo]``). The keys are QEMU's, dashes included, so the dictionaries use
the functional ``TypedDict`` syntax.

Argument types hold no ``Any`` (nested objects are ``dict[str, object]``): an ``Any`` inside
would make mypy treat the typed and the general form as equally good and answer ``Any``.

mypy checks the keys and value types of a dictionary against the command's ``TypedDict`` when
the dictionary is annotated with it (``args: DriveBackupArgs = {...}``, then
``storage.execute("drive-backup", args)``). An unannotated dictionary that does not fit (or any
other command) falls through to the general ``execute(name: str, arguments: Mapping | None) ->
Any``, so untyped callers keep working unchanged; the command layer still checks every argument
against its schema at run time (``GenericError``).
"""

from typing import Any, Literal, NotRequired, Required, TypedDict

#: QMP's empty ``return`` (``{}``), what every command that does not query returns
Empty = dict[str, Any]

#: a child given by node name or as inline ``BlockdevOptions``
BlockdevRef = str | dict[str, object]

SyncMode = Literal["top", "full", "none", "incremental", "bitmap"]
OnError = Literal["report", "ignore", "enospc", "stop", "auto"]

BlockdevAddArgs = TypedDict(
    "BlockdevAddArgs",
    {
        "driver": Required[str],
        "node-name": str,
        "read-only": bool,
        "auto-read-only": bool,
        "force-share": bool,
        "discard": Literal["ignore", "unmap"],
        "detect-zeroes": Literal["off", "on", "unmap"],
        "cache": dict[str, bool],
        # file
        "filename": str,
        "locking": Literal["auto", "on", "off"],
        "aio": str,
        # qcow2, raw, snapshot-access, copy-before-write
        "file": BlockdevRef,
        "backing": BlockdevRef | None,
        "offset": int,
        "size": int,
        # copy-before-write
        "target": BlockdevRef,
        "bitmap": dict[str, str],
        "on-cbw-error": Literal["break-guest-write", "break-snapshot"],
        "cbw-timeout": int,
        # null-co
        "read-zeroes": bool,
        # blkdebug
        "image": BlockdevRef,
        "config": str,
        "inject-error": list[dict[str, object]],
        # nbd (a remote server: push backup's target)
        "server": dict[str, str],
        "export": str,
        "tls-creds": str,
        "tls-hostname": str,
        "reconnect-delay": int,
        "open-timeout": int,
        "multi-conn": int,
        "x-request-timeout": int,
    },
    total=False,
)
"""``blockdev-add``: QEMU's ``BlockdevOptions`` for the drivers fleece has (``driver`` required;
``node-name`` too for the root node). Returns :data:`Empty`."""

DeviceAddArgs = TypedDict(
    "DeviceAddArgs",
    {
        "driver": Required[str],
        "id": str,
        "drive": str,
        "share-rw": bool,
        "bus": str,
        "serial": str,
    },
    total=False,
)
"""``device_add``: ``{driver: "virtio-blk", id: "virtio0", drive: NODE}``. Returns
:data:`Empty`."""

_BackupCommon = TypedDict(
    "_BackupCommon",
    {
        "device": Required[str],
        "sync": Required[SyncMode],
        "job-id": str,
        "speed": int,
        "auto-finalize": bool,
        "auto-dismiss": bool,
        "on-source-error": OnError,
        "on-target-error": OnError,
        "bitmap": str,
        "bitmap-mode": Literal["on-success", "never", "always"],
        "compress": bool,
        "filter-node-name": str,
        "x-perf": dict[str, int],
        "target-size-limit": int,
        "on-cbw-error": Literal["break-guest-write", "break-snapshot"],
    },
    total=False,
)


_DriveBackupTarget = TypedDict(
    "_DriveBackupTarget",
    {
        "target": Required[str],
        "format": str,
        "mode": Literal["existing", "absolute-paths"],
        "target-id": str,
        "target-temporary": bool,
    },
    total=False,
)


class DriveBackupArgs(_BackupCommon, _DriveBackupTarget, total=False):
    """``drive-backup``: back ``device`` up into the image file ``target`` (fleece's own
    ``target-id`` names the target node, ``target-temporary`` deletes its file when it closes).
    Returns :data:`Empty`."""


_BlockdevBackupTarget = TypedDict(
    "_BlockdevBackupTarget", {"target": Required[str], "discard-source": bool}, total=False
)


class BlockdevBackupArgs(_BackupCommon, _BlockdevBackupTarget, total=False):
    """``blockdev-backup``: back ``device`` up into the node ``target`` (``discard-source``
    discards what was copied from the source: for a push from a snapshot-access node, from the
    fleecing image). Returns :data:`Empty`."""


class SocketAddressLegacy(TypedDict):
    """``{"type": "unix", "data": {"path": P}}`` or ``{"type": "inet", "data": {"host": H,
    "port": "10809"}}``."""

    type: Literal["unix", "inet", "fd", "vsock"]
    data: dict[str, object]

NbdServerStartArgs = TypedDict(
    "NbdServerStartArgs",
    {
        "addr": Required[SocketAddressLegacy],
        "tls-creds": str,
        "tls-authz": str,
        "max-connections": int,
        "handshake-max-seconds": int,
    },
    total=False,
)
"""``nbd-server-start``. Returns :data:`Empty`."""


class NbdServerAddArgs(TypedDict, total=False):
    """``nbd-server-add``: export ``device`` (a device or node name) as ``name``. Returns
    :data:`Empty`."""

    device: Required[str]
    name: str
    description: str
    writable: bool
    bitmap: str


BlockJobInfo = TypedDict(
    "BlockJobInfo",
    {
        "type": str,
        "device": str,
        "len": int,
        "offset": int,
        "busy": bool,
        "paused": bool,
        "speed": int,
        "io-status": Literal["ok", "failed", "nospace"],
        "ready": bool,
        "status": str,
        "auto-finalize": bool,
        "auto-dismiss": bool,
        "error": NotRequired[str],
        "fleecing": NotRequired[dict[str, Any]],
        "snapshot": NotRequired[dict[str, Any]],
    },
)
"""One entry of ``query-block-jobs`` (QEMU's ``BlockJobInfo``); ``device`` is the job's id.
fleece adds ``fleecing`` to a backup job's entry: its copy-before-write state (clusters copied,
target use and limit, broken or not); and ``snapshot`` to a push from a snapshot-access node:
the fleecing image it reads (``fleecing-image``, ``copied-bytes``, ``actual-size``)."""
