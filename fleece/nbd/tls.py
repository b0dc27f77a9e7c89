"""TLS credentials as QEMU's ``tls-creds-x509`` object: a directory of PEM files.

The layout is QEMU's: ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for a server
endpoint (``ca-crl.pem`` is honoured when present). ``verify-peer`` (QEMU's default: true)
requires clients to present a certificate signed by the CA.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from fleece.errors import GenericError


@dataclass(eq=False)
class TLSCredsX509:
    """A loaded ``tls-creds-x509`` object; ``context`` is the server-side ``SSLContext``."""

    id: str
    dir: str
    endpoint: str
    verify_peer: bool
    context: ssl.SSLContext
    users: set[str] = field(default_factory=set)


def load_x509(object_id: str, directory: str, endpoint: str, verify_peer: bool) -> TLSCredsX509:
    """Load the credentials from ``directory``. ``GenericError`` naming the file that is missing
    or unreadable, or for an endpoint other than ``server`` (fleece only serves)."""
    if endpoint != "server":
        raise GenericError(f"tls-creds-x509 '{object_id}': only endpoint 'server' is supported")
    ca = os.path.join(directory, "ca-cert.pem")
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    for path in (ca, cert, key):
        if not os.path.exists(path):
            raise GenericError(f"Unable to access credentials {path}: No such file or directory")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
        crl = os.path.join(directory, "ca-crl.pem")
        if os.path.exists(crl):
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as exc:
        raise GenericError(f"Cannot load TLS credentials from '{directory}': {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return TLSCredsX509(object_id, directory, endpoint, verify_peer, context)
