"""Built-in sevsim plugins, one package per feature area of the SEV-ES series."""
