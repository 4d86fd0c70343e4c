"""The guest agent: an asyncio client of qemu-guest-agent, and its socket found over QMP."""
