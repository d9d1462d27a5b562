"""videofeat: fine-tune video transformers and extract per-window features at scale.

Data flows one way: ``manifests`` (videos -> frozen shards) -> ``launcher`` (plans, ranks)
-> ``workers`` (decode, infer, write shards) -> reducer (dataset, exports).
"""

__version__ = "0.1.0"


def version_major_minor() -> str:
    """The part of the version that enters run fingerprints."""
    major, minor, *_ = __version__.split(".")
    return f"{major}.{minor}"
