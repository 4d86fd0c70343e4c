"""The backup repository: records, images, and the backup, restore, verify, prune on it."""
