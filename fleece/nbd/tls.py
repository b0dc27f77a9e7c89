"""TLS credentials as QEMU's ``tls-creds-x509`` object: a directory of PEM files.

The layout is QEMU's: ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for a server
endpoint (``ca-crl.pem`` is honoured when present). ``verify-peer`` (QEMU's default: true)
requires clients to present a certificate signed by the CA. A client endpoint (the ``nbd`` block
driver's ``tls-creds``) has ``ca-cert.pem`` and, optionally, ``client-cert.pem`` and
``client-key.pem``; ``verify-peer`` then checks the server's certificate against the CA.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from fleece.errors import GenericError


@dataclass(eq=False)
class TLSCredsX509:
    """A loaded ``tls-creds-x509`` object; ``context`` is its ``SSLContext`` (server side for a
    server endpoint, client side without host name checks for a client endpoint)."""

    id: str
    dir: str
    endpoint: str
    verify_peer: bool
    context: ssl.SSLContext
    users: set[str] = field(default_factory=set)


def load_x509(object_id: str, directory: str, endpoint: str, verify_peer: bool) -> TLSCredsX509:
    """Load the credentials from ``directory``. ``GenericError`` naming the file that is missing
    or unreadable, or for an endpoint other than ``server`` and ``client``."""
    if endpoint == "client":
        context = client_context(directory, verify_peer, None)
        return TLSCredsX509(object_id, directory, endpoint, verify_peer, context)
    if endpoint != "server":
        raise GenericError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
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


def client_context(directory: str, verify_peer: bool, hostname: str | None) -> ssl.SSLContext:
    """A client-side ``SSLContext`` from a client endpoint's ``directory``: the CA checks the
    server's certificate (``verify_peer``), and its name when ``hostname`` is given; the client
    presents ``client-cert.pem`` when there is one. ``GenericError`` as :func:`load_x509`."""
    ca = os.path.join(directory, "ca-cert.pem")
    cert = os.path.join(directory, "client-cert.pem")
    key = os.path.join(directory, "client-key.pem")
    if not os.path.exists(ca):
        raise GenericError(f"Unable to access credentials {ca}: No such file or directory")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca)
        if os.path.exists(cert):
            if not os.path.exists(key):
                raise GenericError(
                    f"Unable to access credentials {key}: No such file or directory"
                )
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise GenericError(f"Cannot load TLS credentials from '{directory}': {exc}") from None
    context.check_hostname = verify_peer and hostname is not None
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return context
