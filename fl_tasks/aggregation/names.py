"""Strategy names, importable without numpy so that DAG files can build their trigger form."""

STRATEGY_NAMES: tuple[str, ...] = ("fedavg",)
