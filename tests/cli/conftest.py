from ._helpers import series, single  # noqa: F401  (fixtures)
