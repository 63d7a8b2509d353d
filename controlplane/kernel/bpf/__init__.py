"""BPF: the reuseport program (bcc loader), raw bpf(2) for services, fd handover."""
