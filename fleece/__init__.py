"""fleece: export a point-in-time snapshot of a live virtual disk over NBD.

The package is a library first: :mod:`fleece.storage` is the command layer, one method per QMP
command. The daemon, the NBD server and the QMP server are thin adapters around it.
"""

__version__ = "0.1.0"
