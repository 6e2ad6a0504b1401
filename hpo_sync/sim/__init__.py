"""A faithful simulator of PAI AutoML's ListHpoExperiments API, for tests, benchmarks and
the demo: ``world`` (the pure model) and ``server`` (the aiohttp gateway around it)."""

DEFAULT_ACCESS_KEY_ID = "sim-access-key-id"
DEFAULT_ACCESS_KEY_SECRET = "sim-access-key-secret"
