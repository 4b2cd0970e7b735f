"""The only modules that talk to the kernel (netlink, ICMP, /proc). They return plain dataclasses."""
