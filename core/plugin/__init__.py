"""The pluggy plugin host: hookspecs, discovery, configuration, conflicts."""
