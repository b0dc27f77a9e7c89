"""fleece's NBD server: ``proto`` (sans-I/O protocol), ``server`` (asyncio transport and
exports), ``commands`` (the QMP commands mixed into ``Storage``), ``client`` (a small client)."""
