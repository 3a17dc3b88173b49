"""Kafka plumbing shared by the pipeline, the tools and the client: `config` (kafka-python keyword arguments from
the settings) and `topics` (topics created, or checked, with size limits that match the settings)."""
