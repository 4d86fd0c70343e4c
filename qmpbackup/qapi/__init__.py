"""QAPI support: checking planned QMP commands against QEMU's introspected schema."""
