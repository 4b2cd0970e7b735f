"""Plumbing shared by setup and exporter: namespaces, the rtnetlink codec, YAML reading, logfmt, the lab file."""
