"""The per-VM state directory: checkpoint metadata, backups in progress, journals, its lock."""
