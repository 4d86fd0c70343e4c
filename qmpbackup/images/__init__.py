"""Image files: qemu-img and qemu-nbd on them, and the qcow2 a pull copy writes itself."""
