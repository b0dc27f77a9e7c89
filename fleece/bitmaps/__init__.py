"""Dirty bitmap commands (``block-dirty-bitmap-*``) and their use by backups and exports."""
