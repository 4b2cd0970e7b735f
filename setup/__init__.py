"""kvmnet: lab provisioning for KVM/QEMU bridge networking (installed as kvmnet.setup)."""
