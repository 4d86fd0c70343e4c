"""Talking to QEMU over QMP: the session, the block graph it reports, its jobs."""
