"""The types of ``fleece daemon``'s options, as qemu-storage-daemon 7.2's QAPI schema has them.

Members are listed in QEMU's order, since the first problem QEMU reports depends on it. Where
fleece has less than QEMU (drivers, export types, address families, object types), the value
is known but refused with a message that says fleece lacks it; where fleece has more (the
``min-cluster-size``-style copy-before-write knobs, ``handshake-max-seconds``), the extra
members are marked in comments.
"""

from __future__ import annotations

from fleece.keyval import (
    ANY,
    BOOL,
    INT,
    STR,
    UINT64,
    Alternate,
    Enum,
    ListOf,
    Member,
    Scalar,
    Struct,
    Union,
)

INT32, UINT16, UINT32 = Scalar("int32"), Scalar("uint16"), Scalar("uint32")


def _opt(name: str, qtype: object) -> Member:
    assert isinstance(qtype, Scalar | Enum | ListOf | Struct | Union | Alternate)
    return Member(name, qtype, optional=True)


#: the drivers fleece opens (``fleece.block.drivers``)
FLEECE_DRIVERS = ("blkdebug", "copy-before-write", "file", "nbd", "null-co", "qcow2", "raw",
                  "snapshot-access")
#: QEMU 7.2's BlockdevDriver values
QEMU_DRIVERS = (
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum",
    "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
)

_BLOCKDEV_BASE: tuple[Member, ...] = (
    Member("driver", Enum(QEMU_DRIVERS)),
    _opt("node-name", STR),
    _opt("discard", Enum(("ignore", "unmap"))),
    _opt("cache", Struct((_opt("direct", BOOL), _opt("no-flush", BOOL)))),
    _opt("read-only", BOOL),
    _opt("auto-read-only", BOOL),
    _opt("force-share", BOOL),
    _opt("detect-zeroes", Enum(("off", "on", "unmap"))),
)

# BlockdevRef needs BlockdevOptions: the union is built first with empty branches, then filled.
_BRANCHES: dict[str, tuple[Member, ...]] = {}
BLOCKDEV = Union(
    base=_BLOCKDEV_BASE, discriminator="driver", branches=_BRANCHES,
    unsupported={name: f"Driver '{name}' is not supported by fleece (it has "
                       + ", ".join(FLEECE_DRIVERS) + ")"
                 for name in QEMU_DRIVERS if name not in FLEECE_DRIVERS},
)
BLOCKDEV_REF = Alternate("BlockdevRef", BLOCKDEV)
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", BLOCKDEV, null_ok=True)
BLOCK_DIRTY_BITMAP = Struct((Member("node", STR), Member("name", STR)))
_PERMISSION = Enum(("consistent-read", "write", "write-unchanged", "resize"))

_BRANCHES.update({
    "file": (
        Member("filename", STR), _opt("pr-manager", STR),
        _opt("locking", Enum(("off", "on", "auto"))),
        _opt("aio", Enum(("threads", "native", "io_uring"))), _opt("aio-max-batch", INT),
        _opt("drop-cache", BOOL), _opt("x-check-cache-dropped", BOOL),
    ),
    "null-co": (_opt("size", INT), _opt("latency-ns", UINT64), _opt("read-zeroes", BOOL)),
    "raw": (Member("file", BLOCKDEV_REF), _opt("offset", INT), _opt("size", INT)),
    "qcow2": (
        Member("file", BLOCKDEV_REF), _opt("backing", BLOCKDEV_REF_OR_NULL),
        _opt("lazy-refcounts", BOOL), _opt("pass-discard-request", BOOL),
        _opt("pass-discard-snapshot", BOOL), _opt("pass-discard-other", BOOL),
        _opt("overlap-check", ANY), _opt("cache-size", INT), _opt("l2-cache-size", INT),
        _opt("l2-cache-entry-size", INT), _opt("refcount-cache-size", INT),
        _opt("cache-clean-interval", INT), _opt("encrypt", ANY), _opt("data-file", BLOCKDEV_REF),
    ),
    "blkdebug": (
        Member("image", BLOCKDEV_REF), _opt("config", STR), _opt("align", INT),
        _opt("max-transfer", INT32), _opt("opt-write-zero", INT32),
        _opt("max-write-zero", INT32), _opt("opt-discard", INT32), _opt("max-discard", INT32),
        _opt("inject-error", ListOf(Struct((
            Member("event", STR), _opt("state", INT),
            _opt("iotype", ListOf(Enum(("read", "write", "write-zeroes", "discard", "flush",
                                        "block-status")))),
            _opt("errno", INT), _opt("sector", INT), _opt("once", BOOL),
            _opt("immediately", BOOL),
        )))),
        _opt("set-state", ListOf(Struct((
            Member("event", STR), _opt("state", INT), Member("new_state", INT),
        )))),
        _opt("take-child-perms", ListOf(_PERMISSION)),
        _opt("unshare-child-perms", ListOf(_PERMISSION)),
    ),
    "copy-before-write": (
        Member("file", BLOCKDEV_REF), Member("target", BLOCKDEV_REF),
        _opt("bitmap", BLOCK_DIRTY_BITMAP),
        _opt("on-cbw-error", Enum(("break-guest-write", "break-snapshot"))),
        _opt("cbw-timeout", UINT32),
        # fleece's own (QEMU 8.2 has min-cluster-size; the rest are fleece's knobs)
        _opt("min-cluster-size", INT), _opt("target-size-limit", INT),
        _opt("x-copy-ahead", INT), _opt("x-write-behind", INT),
    ),
    "snapshot-access": (Member("file", BLOCKDEV_REF),),
})

#: BlockExportOptions (only ``nbd`` is served by fleece)
EXPORT = Union(
    base=(
        Member("type", Enum(("nbd", "vhost-user-blk", "fuse", "vduse-blk"))),
        Member("id", STR), _opt("fixed-iothread", BOOL), _opt("iothread", STR),
        Member("node-name", STR), _opt("writable", BOOL), _opt("writethrough", BOOL),
    ),
    discriminator="type",
    branches={"nbd": (
        _opt("name", STR), _opt("description", STR),
        _opt("bitmaps", ListOf(Alternate("BlockDirtyBitmapOrStr", BLOCK_DIRTY_BITMAP))),
        _opt("allocation-depth", BOOL),
    )},
    unsupported={kind: f"Export type '{kind}' is not supported by fleece (it has nbd)"
                 for kind in ("vhost-user-blk", "fuse", "vduse-blk")},
)

#: SocketAddress, the flat form the command line uses
SOCKET_ADDRESS = Union(
    base=(Member("type", Enum(("inet", "unix", "vsock", "fd"))),),
    discriminator="type",
    branches={
        "inet": (Member("host", STR), Member("port", STR), _opt("numeric", BOOL),
                 _opt("to", UINT16), _opt("ipv4", BOOL), _opt("ipv6", BOOL),
                 _opt("keep-alive", BOOL), _opt("mptcp", BOOL)),
        "unix": (Member("path", STR), _opt("abstract", BOOL), _opt("tight", BOOL)),
        "vsock": (Member("cid", STR), Member("port", STR)),
        "fd": (Member("str", STR),),
    },
)

#: BlockdevOptionsNbd: a node served by a remote NBD server (push backup's target)
_BRANCHES["nbd"] = (
    Member("server", SOCKET_ADDRESS), _opt("export", STR), _opt("tls-creds", STR),
    _opt("tls-hostname", STR), _opt("x-dirty-bitmap", STR), _opt("reconnect-delay", UINT32),
    _opt("open-timeout", UINT32), _opt("multi-conn", UINT32), _opt("x-request-timeout", UINT32),
)

#: NbdServerOptions
NBD_SERVER = Struct((
    Member("addr", SOCKET_ADDRESS), _opt("tls-creds", STR), _opt("tls-authz", STR),
    _opt("max-connections", UINT32),
    _opt("handshake-max-seconds", UINT32),  # fleece's own (QEMU 8.2 has it in nbd-server-start)
))

#: MonitorOptions
MONITOR = Struct((
    _opt("id", STR), _opt("mode", Enum(("readline", "control"))), _opt("pretty", BOOL),
    Member("chardev", STR),
))

#: QEMU 7.2's ObjectType values that a storage daemon may be given
QEMU_OBJECT_TYPES = (
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "cryptodev-backend",
    "filter-buffer", "input-barrier", "iothread", "main-loop", "memory-backend-file",
    "memory-backend-memfd", "memory-backend-ram", "pr-manager-helper", "rng-builtin",
    "rng-egd", "rng-random", "secret", "secret_keyring", "throttle-group", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object",
)

#: ObjectOptions
OBJECT = Union(
    base=(Member("qom-type", Enum(QEMU_OBJECT_TYPES)), Member("id", STR)),
    discriminator="qom-type",
    branches={"tls-creds-x509": (
        _opt("verify-peer", BOOL), _opt("dir", STR),
        _opt("endpoint", Enum(("client", "server"))), _opt("priority", STR),
        _opt("loaded", BOOL), _opt("sanity-check", BOOL), _opt("passwordid", STR),
    )},
    unsupported={kind: f"Object type '{kind}' is not supported by fleece (it has "
                       "tls-creds-x509)"
                 for kind in QEMU_OBJECT_TYPES if kind != "tls-creds-x509"},
)

#: fleece's ``--drive``: a node and a virtio-blk device in one option (not in QEMU's daemon)
DRIVE = Struct((
    Member("id", STR), Member("file", STR), _opt("format", Enum(("qcow2", "raw"))),
    _opt("readonly", BOOL),
))
