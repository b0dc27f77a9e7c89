"""``Storage``: the command layer. One method per QMP command, usable directly from Python.

``Storage.execute(name, arguments)`` takes a command and its arguments exactly as QEMU's schema
spells them and returns the QMP ``return`` value, or raises a :class:`fleece.errors.QMPError`
carrying the QMP error class. The QMP server is a thin adapter over ``execute``; a harness may
call ``execute`` or the methods directly, and drives guest I/O through :meth:`Storage.device`.
"""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from fleece.bitmaps.commands import BitmapCommands
from fleece.block.device import DEVICE_DRIVERS, Device
from fleece.block.dirty_bitmap import add_bitmap_info
from fleece.block.graph import BlockGraph
from fleece.block.node import BlockNode, UserKind
from fleece.command_types import (
    BlockdevAddArgs,
    BlockdevBackupArgs,
    BlockJobInfo,
    DeviceAddArgs,
    DriveBackupArgs,
    Empty,
    NbdServerAddArgs,
    NbdServerStartArgs,
)
from fleece.commands import Command, Nodes, command, command_table
from fleece.errors import CommandNotFound, DeviceNotFound, GenericError
from fleece.events import Event, EventBus
from fleece.jobs.commands import JobCommands
from fleece.nbd.commands import ExportCommands
from fleece.schema import Schema, check_arguments
from fleece.transaction import TransactionCommands

if TYPE_CHECKING:
    from fleece.jobs.job import Job
    from fleece.nbd.server import NBDServer
    from fleece.nbd.tls import TLSCredsX509

#: the name of the thread that closes a ``Storage`` collected without ``close()``
FINALIZER_THREAD = "fleece-storage-finalizer"


class Storage:
    """The block graph, devices, jobs and exports of one fleece instance.

    Its own commands are the nodes' and devices'; the others belong to command groups it
    builds and owns (``job_commands``, ``export_commands``, ``bitmap_commands``,
    ``transaction_commands``), each given what it uses. :meth:`execute` is the one entry to
    all of them.

    Thread-safe: commands may come from the QMP loop and from a harness's threads at once; they
    are serialised by one lock, while guest I/O through devices runs in parallel.
    """

    def __init__(self) -> None:
        """An empty instance: no node, device, job or export. Use it as ``with Storage() as
        storage:`` (or call :meth:`close`): one collected unclosed warns (``ResourceWarning``)."""
        self.graph = BlockGraph()
        self.devices: dict[str, Device] = {}
        self.events = EventBus()
        self._lock = threading.RLock()
        self._closed = False
        self.nodes = Nodes(self.graph, self.devices)
        self.job_commands = JobCommands(self.nodes, self.events)
        self.export_commands = ExportCommands(self.nodes, self.events)
        self.bitmap_commands = BitmapCommands(self.nodes)
        self.transaction_commands = TransactionCommands(
            self.nodes, self.execute, self.job_commands, self.bitmap_commands)
        self._commands: dict[str, Command] = {}
        for group in (self, self.job_commands, self.export_commands, self.bitmap_commands,
                      self.transaction_commands):
            self._commands.update(command_table(group))
        self._built = True  # from here on, dropping it without close() is a leak (__del__)
        _OPEN.add(self)

    # -- the command entry point -------------------------------------------------------------
    def commands(self) -> list[str]:
        """The names of every command :meth:`execute` runs, sorted (``query-commands``)."""
        return sorted(self._commands)

    def schema(self, name: str) -> Schema:
        """The argument schema of command ``name``; ``KeyError`` when there is no such
        command."""
        return self._commands[name][1].schema

    # Typed forms of the common commands (fleece.command_types says what mypy checks); any
    # other command, or arguments not typed so, take the last, general form.
    @overload
    def execute(self, name: Literal["blockdev-add"], arguments: BlockdevAddArgs) -> Empty: ...
    @overload
    def execute(self, name: Literal["device_add"], arguments: DeviceAddArgs) -> Empty: ...
    @overload
    def execute(self, name: Literal["drive-backup"], arguments: DriveBackupArgs) -> Empty: ...
    @overload
    def execute(self, name: Literal["blockdev-backup"], arguments: BlockdevBackupArgs
                ) -> Empty: ...
    @overload
    def execute(self, name: Literal["nbd-server-start"], arguments: NbdServerStartArgs
                ) -> Empty: ...
    @overload
    def execute(self, name: Literal["nbd-server-add"], arguments: NbdServerAddArgs
                ) -> Empty: ...
    @overload
    def execute(self, name: Literal["query-block-jobs"], arguments: None = None
                ) -> list[BlockJobInfo]: ...
    @overload
    def execute(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run command ``name`` with ``arguments`` (QEMU's names and JSON types); returns its
        QMP ``return`` value. Commands are serialised with each other (not with device I/O).

        Raises a :class:`fleece.errors.QMPError` whose ``qmp_class`` QMP would answer:
        ``CommandNotFound`` for an unknown command, ``GenericError`` for arguments that do not
        fit the command's schema, for a closed ``Storage``, or as the command itself decides.
        """
        entry = self._commands.get(name)
        if entry is None:
            raise CommandNotFound(f"The command {name} has not been found")
        method, spec = entry
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, dict):
            raise GenericError("QMP input member 'arguments' must be an object")
        check_arguments(spec.schema, arguments)
        with self._lock:
            if self._closed:
                raise GenericError("fleece is shutting down")
            if spec.whole:
                return method(dict(arguments))
            return method(**{key.replace("-", "_"): value for key, value in arguments.items()})

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` with every event from now on, in the thread that emits it (a job's,
        the QMP loop's, the caller's): it must not block. Returns the function that
        unsubscribes."""
        return self.events.subscribe(callback)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        """Send event ``name`` with ``data`` to every subscriber, now, in this thread; returns
        it (with its timestamp)."""
        return self.events.emit(name, data)

    # -- lookups used by every command -------------------------------------------------------
    def device(self, name: str) -> Device:
        """The device ``name`` (``device_add``'s ``id``), which a harness drives with
        ``pread``/``pwrite``/... from any thread. ``DeviceNotFound`` when there is none."""
        device = self.devices.get(name)
        if device is None:
            raise DeviceNotFound(f"Device '{name}' not found")
        return device

    def find_node(self, name: str) -> BlockNode:
        """A node by device name or node name, as QEMU's ``device`` arguments take it.

        Raises :class:`fleece.errors.NodeNotFound` (QMP class ``GenericError``, as QEMU's)."""
        return self.nodes.find(name)

    @property
    def jobs(self) -> dict[str, Job]:
        """The jobs not dismissed yet, by id (the job group's table; read, do not change)."""
        return self.job_commands.jobs

    @property
    def nbd_server(self) -> NBDServer | None:
        """The running NBD server (``nbd_server.addresses`` tells where it listens), or None."""
        return self.export_commands.nbd_server

    @property
    def tls_objects(self) -> dict[str, TLSCredsX509]:
        """The ``tls-creds-x509`` objects by id."""
        return self.export_commands.tls_objects

    # -- block nodes -------------------------------------------------------------------------
    @command("blockdev-add", None)
    def blockdev_add(self, options: dict[str, Any]) -> dict[str, Any]:
        """Open a node (and its inline children) from ``BlockdevOptions``; the monitor holds
        its reference until ``blockdev-del``. ``GenericError`` for a root without
        ``node-name``, a name in use, unknown or bad options, or an image that cannot be
        opened."""
        if "node-name" not in options:
            raise GenericError("'node-name' must be specified for the root node")
        node = self.graph.open_node(options)
        node.add_user(UserKind.MONITOR, "owned by the monitor")
        return {}

    @command("blockdev-del", {"node-name": "str"})
    def blockdev_del(self, node_name: str) -> dict[str, Any]:
        """Drop the monitor's reference; the node closes when nobody else holds it.
        ``GenericError`` (naming the user) while a job, device, export or parent uses it, for
        a node the monitor does not own, or an unknown name."""
        node = self.graph.find(node_name)
        if node is None:
            raise GenericError(f"Failed to find node with node-name='{node_name}'")
        # QEMU's order: a job's blocker first, then ownership, then any other user.
        busy = sorted(node.busy_users(), key=lambda user: user.kind is not UserKind.JOB)
        if busy and busy[0].kind is UserKind.JOB:
            raise GenericError(f"Node '{node_name}' is busy: {busy[0].description}")
        monitor = node.monitor_user()
        if monitor is None:
            raise GenericError(f"Node {node_name} is not owned by the monitor")
        if busy:
            raise GenericError(f"Node '{node_name}' is busy: {busy[0].description}")
        monitor.release()
        return {}

    @command("query-named-block-nodes", {"*flat": "bool"})
    def query_named_block_nodes(self, flat: bool = False) -> list[dict[str, Any]]:
        """QEMU's ``BlockDeviceInfo`` for every named node, implicit filters included;
        ``flat`` leaves out each image's backing chain."""
        result = []
        for node in self.graph.nodes():
            info = add_bitmap_info(node.info(), node)
            if flat:
                info["image"].pop("backing-image", None)
            result.append(info)
        return result

    @command("query-block", {})
    def query_block(self) -> list[dict[str, Any]]:
        """QEMU's ``BlockInfo`` for every device, describing the node below any implicit
        filter a job inserted (as QEMU shows it)."""
        return [
            {
                "device": device.id,
                "qdev": f"/machine/peripheral/{device.id}/virtio-backend",
                "type": "unknown",
                "removable": False,
                "locked": False,
                "io-status": "ok",
                "inserted": add_bitmap_info(node.info(), node),
            }
            for device in self.devices.values()
            for node in [device.node.skip_implicit_filters()]
        ]

    # -- devices -----------------------------------------------------------------------------
    @command(
        "device_add",
        {"driver": "str", "*id": "str", "*drive": "str", "*share-rw": "bool", "*bus": "str",
         "*serial": "str"},
    )
    def device_add(
        self,
        driver: str,
        id: str | None = None,
        drive: str | None = None,
        share_rw: bool = False,
        bus: str | None = None,
        serial: str | None = None,
    ) -> dict[str, Any]:
        """Hot plug a disk: ``{driver: "virtio-blk", id: "virtio0", drive: NODE}``; the device
        holds a reference on the node (see :meth:`device`). ``GenericError`` for an unknown
        model, a missing or taken ``id``, a missing or unknown ``drive``, or a node whose
        permissions conflict with its other users'."""
        if driver not in DEVICE_DRIVERS:
            raise GenericError(f"'{driver}' is not a valid device model name")
        if id is None:
            raise GenericError("Parameter 'id' is missing: fleece devices need an id")
        if drive is None:
            raise GenericError(f"{driver}: drive property not set")
        if id in self.devices:
            raise GenericError(f"Duplicate device ID '{id}'")
        node = self.graph.find(drive)
        if node is None:
            raise GenericError(
                f"Property '{driver}.drive' can't find value '{drive}'"
            )
        self.devices[id] = Device(id, driver, node, share_rw=share_rw)
        return {}

    @command("device_del", {"id": "str"})
    def device_del(self, id: str) -> dict[str, Any]:
        """Hot unplug: release the device's reference and emit ``DEVICE_DELETED``. The
        ``Device`` object no longer holds its node and must not be used any more.
        ``DeviceNotFound`` for an unknown ``id``."""
        device = self.devices.pop(id, None)
        if device is None:
            raise DeviceNotFound(f"Device '{id}' not found")
        device.unplug()
        self.emit("DEVICE_DELETED", {"device": id, "path": f"/machine/peripheral/{id}"})
        return {}

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything: jobs cancelled (and waited for), the NBD server and its
        exports stopped (a unix socket it created removed), devices unplugged, then the
        monitor's references; every node is flushed and closed, its file left on disk (unless
        made temporary). Idempotent; commands fail with ``GenericError`` afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.job_commands.cancel_all_jobs()
            self.export_commands.close()
            for device in list(self.devices.values()):
                device.unplug()
            self.devices.clear()
            for node in self.graph.nodes():
                for user in list(node.users):
                    if user.kind is UserKind.MONITOR:
                        user.release()
            # Anything left is held by a user that forgot to let go: release those users from
            # the top of the graph down (a parent closes before its children, which its links
            # then release), never a child link directly.
            while True:
                roots = [n for n in self.graph.nodes() if not self.graph.links_to(n)]
                if not roots:
                    break
                for node in roots:
                    for user in list(node.users):
                        user.release()

    def __enter__(self) -> Storage:
        """``with Storage() as storage:`` closes it when the block ends, however it ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        """Collected without :meth:`close`: warn (``ResourceWarning``), then close it anyway.

        The closing runs in a thread of its own, ``FINALIZER_THREAD`` (the garbage collector
        may run in a job's, the NBD server's or a vCPU's thread, which closing would wait
        for), or inline when the interpreter no longer starts threads. It does what
        ``close()`` does: jobs cancelled, exports and the NBD server stopped (its socket file
        removed), every node flushed and closed, so the images stay consistent.
        """
        if not self.__dict__.get("_built") or self._closed:
            return
        _warn_unclosed(self, "collected")
        try:
            threading.Thread(target=self.close, name=FINALIZER_THREAD).start()
        except RuntimeError:  # interpreter shutdown: no new threads
            self.close()


#: every ``Storage`` built and not collected yet; those still open at exit are closed then
_OPEN: weakref.WeakSet[Storage] = weakref.WeakSet()


def _warn_unclosed(storage: Storage, when: str) -> None:
    warnings.warn(
        f"fleece Storage {when} without close(): closing it now; use "
        "`with Storage() as storage:` or call close()",
        ResourceWarning, stacklevel=3, source=storage,
    )


@atexit.register
def _close_open_storages() -> None:
    """At exit, while job and server threads still run: close every ``Storage`` left open
    (with the same ``ResourceWarning``), so that none is left to a half-torn-down interpreter."""
    for storage in list(_OPEN):
        if not storage._closed:
            _warn_unclosed(storage, "left open at exit")
            storage.close()
