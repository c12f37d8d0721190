"""The compared methods, one module each (see :mod:`methods.registry` and docs/federated.md,
"Adding a method"). Nothing is imported here: the registry finds the modules itself."""
