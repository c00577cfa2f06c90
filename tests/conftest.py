"""Shared fixtures, one plugin module per concern."""

pytest_plugins = [
    "tests.redis_fixtures",
    "tests.sim_fixtures",
    "tests.server_fixtures",
]
