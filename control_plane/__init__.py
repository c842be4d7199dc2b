"""The cloud side of edged: fleet API, ingest, registry, rollouts, and the model toolchain."""
