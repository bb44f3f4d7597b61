"""The bundle's own code, as model-zoo bundles keep it (the zoo puts the bundle folder on ``sys.path``)."""
