"""Server halves: one Flower strategy per file, each with its params dataclass and `build`.

Nothing here imports `clients/`; the two halves of an algorithm meet in the registry
(`fedsim.algorithms`, filled by `fedsim.registry`).
"""
