"""The ICMP prober: packets, socket and reply matching, per-guest state, targets and discovery, the engine, /probe."""
