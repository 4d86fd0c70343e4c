"""The throwaway QEMU of the demo and the tests, and the demo walking the slides with it."""
