"""The export commands (a command group of ``Storage``): the NBD server, its exports, and TLS
credentials objects.

QEMU's QMP: ``nbd-server-start``/``-add``/``-remove``/``-stop``, ``block-export-add``/``-del``,
``query-block-exports``, the ``BLOCK_EXPORT_DELETED`` event, and ``object-add``/``object-del`` for
``tls-creds-x509``. The server runs its own event loop thread while it is up; these methods may
be called from any thread (``Storage.execute`` serialises them).
"""

from __future__ import annotations

from typing import Any

from fleece.bitmaps.commands import export_bitmap
from fleece.block.dirty_bitmap import DirtyBitmap, find_bitmap, publish, unpublish
from fleece.block.node import BlockNode, UserKind
from fleece.block.perm import Perm
from fleece.block.root import Root
from fleece.commands import Nodes, command
from fleece.errors import GenericError, QMPError
from fleece.events import EventBus
from fleece.nbd.backend import Export
from fleece.nbd.constants import MAX_NAME_LENGTH
from fleece.nbd.server import DEFAULT_MAX_CONNECTIONS, HANDSHAKE_TIMEOUT, NBDServer
from fleece.nbd.tls import TLSCredsX509, load_x509

_SERVER_USER = "nbd-server"


class ExportCommands:
    """The export commands, given the nodes they look up and the event bus; owns
    ``nbd_server`` and ``tls_objects``."""

    def __init__(self, nodes: Nodes, events: EventBus) -> None:
        self.graph = nodes.graph
        self.find_node = nodes.find
        self.emit = events.emit
        #: the running NBD server (``nbd_server.addresses`` tells where it listens), or None
        self.nbd_server: NBDServer | None = None
        self.tls_objects: dict[str, TLSCredsX509] = {}
        self.graph.objects = self.tls_objects  # a block driver names its tls-creds by id
        self._nbd_tls: TLSCredsX509 | None = None

    def _require_server(self) -> NBDServer:
        if self.nbd_server is None:
            raise GenericError("NBD server not running")
        return self.nbd_server

    # -- the server ----------------------------------------------------------------------------
    @command(
        "nbd-server-start",
        {"addr": "object", "*tls-creds": "str", "*tls-authz": "str", "*max-connections": "int",
         "*handshake-max-seconds": "int"},
    )
    def nbd_server_start(
        self,
        addr: dict[str, Any],
        tls_creds: str | None = None,
        tls_authz: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_max_seconds: int = int(HANDSHAKE_TIMEOUT),
    ) -> dict[str, Any]:
        """Start the NBD server listening on ``addr`` (QEMU's ``SocketAddressLegacy``).

        ``max-connections`` (default 100; 0 = no limit) counts clients still in their
        handshake too; ``handshake-max-seconds`` (default 10, as QEMU 7.2; 0 = no limit) closes
        a client that has not chosen an export by then.
        ``GenericError`` when a server is running, the address cannot be bound, the TLS object
        is unknown, a limit is negative, or ``tls-authz`` is given (fleece has no authorization
        objects).
        """
        if self.nbd_server is not None:
            raise GenericError("NBD server already running")
        if max_connections < 0:
            raise GenericError("max-connections must not be negative")
        if handshake_max_seconds < 0:
            raise GenericError("handshake-max-seconds must not be negative")
        creds = None
        if tls_creds is not None:
            creds = self.tls_objects.get(tls_creds)
            if creds is None:
                raise GenericError(f"No TLS credentials with id '{tls_creds}'")
            if creds.endpoint != "server":
                raise GenericError("Expecting TLS credentials with a server endpoint")
        if tls_authz is not None:
            if creds is None:
                raise GenericError("tls-authz is not supported without tls-creds")
            raise GenericError(f"Cannot find authorization object '{tls_authz}'")
        server = NBDServer(
            tls=None if creds is None else creds.context, max_connections=max_connections,
            handshake_timeout=float(handshake_max_seconds),
        )
        try:
            server.listen(addr)
        except BaseException:
            server.close()
            raise
        self.nbd_server = server
        if creds is not None:
            creds.users.add(_SERVER_USER)
            self._nbd_tls = creds
        return {}

    @command("nbd-server-stop", {})
    def nbd_server_stop(self) -> dict[str, Any]:
        """Remove every export (releasing their nodes) and stop the server."""
        server = self._require_server()
        self._stop_server(server)
        return {}

    def _stop_server(self, server: NBDServer) -> None:
        self.nbd_server = None
        if self._nbd_tls is not None:
            self._nbd_tls.users.discard(_SERVER_USER)
            self._nbd_tls = None
        for export in server.close():
            self._forget_export(export)

    def close(self) -> None:
        """Shutdown: stop the server, if one runs, and drop every export."""
        if self.nbd_server is not None:
            self._stop_server(self.nbd_server)

    # -- exports -------------------------------------------------------------------------------
    def _add_export(
        self,
        *,
        export_id: str,
        node_name: str,
        name: str,
        description: str | None,
        writable: bool,
        writethrough: bool,
        bitmaps: list[Any],
        allocation_depth: bool,
        by_device: bool,
    ) -> None:
        """``by_device``: ``node_name`` may name a device too (``nbd-server-add device=``);
        otherwise only a node (``block-export-add node-name=``), as in QEMU."""
        if not by_device:  # QEMU's block-export-add looks the node up before the server
            self.graph.get(node_name)
        server = self._require_server()
        if any(e.name == name for e in server.exports.values()):
            raise GenericError(f"NBD server already has export named '{name}'")
        if export_id in server.exports:
            raise GenericError(f"Block export id '{export_id}' is already in use")
        if len(name.encode()) > MAX_NAME_LENGTH:
            raise GenericError(f"export name '{name[:64]}...' too long")
        if description is not None and len(description.encode()) > MAX_NAME_LENGTH:
            raise GenericError("export description too long")
        node = self.find_node(node_name) if by_device else self.graph.get(node_name)
        exported = [export_bitmap(node, item, not writable, self._export_bitmap_lookup)
                    for item in bitmaps]
        if len({bitmap.name for bitmap in exported}) < len(exported):
            raise GenericError("Duplicate bitmap names in the export's bitmaps")
        if writable and node.read_only:
            raise GenericError(f"Cannot export read-only node '{node.name}' as writable")
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
        user = node.add_user(UserKind.EXPORT, f"exported via NBD as '{name}'", perm, Perm.all())
        export = Export(
            id=export_id,
            name=name,
            root=Root(user),
            description=description or "",
            writable=writable,
            writethrough=writethrough,
            allocation_depth=allocation_depth,
            bitmaps=tuple(bitmap.name for bitmap in exported),
        )
        publish(export, node, exported)
        try:
            server.add_export(export)
        except BaseException:
            unpublish(export)
            user.release()
            raise

    def _export_bitmap_lookup(self, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
        """A ``{node, name}`` bitmap of ``block-export-add bitmaps`` (QEMU's lookup rules)."""
        try:
            holder = self.find_node(node)
        except QMPError as exc:
            raise GenericError(f"Node '{node}' not found") from exc
        bitmap = find_bitmap(holder, name)
        if bitmap is None:
            raise GenericError(f"Dirty bitmap '{name}' not found")
        return holder, bitmap

    def _forget_export(self, export: Export) -> None:
        unpublish(export)
        export.root.release()
        self.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    def _del_export(self, export_id: str, mode: str) -> None:
        server = self.nbd_server
        if server is None or export_id not in server.exports:
            raise GenericError(f"Export '{export_id}' is not found")
        self._forget_export(server.remove_export(export_id, mode))

    @command(
        "nbd-server-add",
        {"device": "str", "*name": "str", "*description": "str", "*writable": "bool",
         "*bitmap": "str"},
    )
    def nbd_server_add(
        self,
        device: str,
        name: str | None = None,
        description: str | None = None,
        writable: bool = False,
        bitmap: str | None = None,
    ) -> dict[str, Any]:
        """Export ``device`` (a device or node name) as ``name`` (default: ``device``).

        The export's id is its name. It offers ``base:allocation`` and ``qemu:allocation-depth``.
        ``GenericError`` without a server, for a taken name, a missing bitmap, or a node that
        cannot be used so; ``DeviceNotFound`` for an unknown device.
        """
        name = device if name is None else name
        self._add_export(
            export_id=name, node_name=device, name=name, description=description,
            writable=writable, writethrough=False, bitmaps=[] if bitmap is None else [bitmap],
            allocation_depth=True, by_device=True,
        )
        return {}

    @command("nbd-server-remove", {"name": "str", "*mode": ("safe", "hard")})
    def nbd_server_remove(self, name: str, mode: str = "safe") -> dict[str, Any]:
        """Remove the export ``name``: ``safe`` refuses while clients use it, ``hard``
        disconnects them. ``GenericError`` without a server or for an unknown export."""
        server = self._require_server()
        export_id = name
        if name not in server.exports:
            found = next((e.id for e in server.exports.values() if e.name == name), None)
            export_id = name if found is None else found
        self._del_export(export_id, mode)
        return {}

    @command(
        "block-export-add",
        {"type": ("nbd", "vhost-user-blk", "fuse", "vduse-blk"), "id": "str", "node-name": "str",
         "*writable": "bool", "*writethrough": "bool", "*fixed-iothread": "bool",
         "*iothread": "str", "*name": "str", "*description": "str", "*bitmaps": "array",
         "*allocation-depth": "bool"},
        whole=True,
    )
    def block_export_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Export a node (``BlockExportOptions``; only ``type: nbd``). ``iothread`` and
        ``fixed-iothread`` are accepted and ignored: every export is served by the server's
        loop thread. Errors as ``nbd-server-add``."""
        if args["type"] != "nbd":
            raise GenericError(f"Export type '{args['type']}' is not supported by fleece")
        self._add_export(
            export_id=args["id"],
            node_name=args["node-name"],
            name=args.get("name", args["node-name"]),
            description=args.get("description"),
            writable=args.get("writable", False),
            writethrough=args.get("writethrough", False),
            bitmaps=list(args.get("bitmaps", [])),
            allocation_depth=args.get("allocation-depth", False),
            by_device=False,
        )
        return {}

    @command("block-export-del", {"id": "str", "*mode": ("safe", "hard")})
    def block_export_del(self, id: str, mode: str = "safe") -> dict[str, Any]:
        """Remove the export ``id``; emits ``BLOCK_EXPORT_DELETED``. ``GenericError`` for an
        unknown export, or with ``safe`` while clients use it."""
        self._del_export(id, mode)
        return {}

    @command("query-block-exports", {})
    def query_block_exports(self) -> list[dict[str, Any]]:
        """``[{type, id, node-name, shutting-down}]`` for every export."""
        server = self.nbd_server
        if server is None:
            return []
        return [
            {"type": "nbd", "id": e.id, "node-name": e.node.name,
             "shutting-down": e.shutting_down}
            for e in list(server.exports.values())
        ]

    # -- objects -------------------------------------------------------------------------------
    @command("object-add", None)
    def object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Create an object; fleece knows ``tls-creds-x509`` (``dir``, ``endpoint``,
        ``verify-peer``). ``GenericError`` for another type, a taken id, or bad credentials."""
        qom_type, object_id = args.get("qom-type"), args.get("id")
        if not isinstance(qom_type, str):
            raise GenericError("Parameter 'qom-type' is missing")
        if not isinstance(object_id, str):
            raise GenericError("Parameter 'id' is missing")
        if qom_type != "tls-creds-x509":
            raise GenericError(f"Invalid object type '{qom_type}' (fleece knows tls-creds-x509)")
        known = {"qom-type", "id", "dir", "endpoint", "verify-peer", "priority", "sanity-check",
                 "loaded"}
        for key in args:
            if key not in known:
                raise GenericError(f"Parameter '{key}' is unexpected")
        if object_id in self.tls_objects:
            raise GenericError(
                f"attempt to add duplicate property '{object_id}' to object (type 'container')"
            )
        directory, endpoint = args.get("dir"), args.get("endpoint", "client")
        verify = args.get("verify-peer", True)
        if not isinstance(directory, str):
            raise GenericError("Parameter 'dir' is missing")
        if endpoint not in ("client", "server"):
            raise GenericError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        if not isinstance(verify, bool):
            raise GenericError("Invalid parameter type for 'verify-peer', expected: boolean")
        self.tls_objects[object_id] = load_x509(object_id, directory, endpoint, verify)
        return {}

    @command("object-del", {"id": "str"})
    def object_del(self, id: str) -> dict[str, Any]:
        """Delete an object; ``GenericError`` when unknown or in use."""
        creds = self.tls_objects.get(id)
        if creds is None:
            raise GenericError(f"object '{id}' not found")
        if creds.users:
            raise GenericError(f"object '{id}' is in use, can not be deleted")
        del self.tls_objects[id]
        return {}
