"""A faithful simulator of PAI AutoML's ListHpoExperiments API, for tests, benchmarks and the demo."""

DEFAULT_ACCESS_KEY_ID = "sim-access-key-id"
DEFAULT_ACCESS_KEY_SECRET = "sim-access-key-secret"
