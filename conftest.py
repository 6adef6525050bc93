# sevsim's own tests use its pytest plugin; a plugin author's project opts in the same way.
pytest_plugins = ["sevsim.testing"]
