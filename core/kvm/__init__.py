"""KVM's side of an SEV-ES guest: the VM and vCPU objects (``kvm_create_vm``,
``KVM_RUN``), ASIDs, the launch commands, the VMGEXIT entry with its validation and
GHCB sync, the exit dispatch table that plugins fill, and the events a trace reads.
It reaches the hardware model only through what KVM itself could use."""
