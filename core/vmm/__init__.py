"""The userspace VMM: firmware images, devices, the run loop over vCPUs (QEMU/Firecracker role)."""
