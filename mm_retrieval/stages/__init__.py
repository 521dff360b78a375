"""Built-in stages. Each module registers its stages with :func:`mm_retrieval.registry.register`;
they are declared as entry points in pyproject.toml so they are found like any plugin."""
