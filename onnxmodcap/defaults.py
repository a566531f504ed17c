"""The method and ModCap mode `quantize` uses when none is given: the combination that measured
best on the shipped models (benchmarks_modcap.md). Kept apart so the CLI can show them without
importing torch."""

DEFAULT_METHOD = "qdrop"
DEFAULT_MODCAP = "off"
