"""mmfuse's serving logic as plain Python modules.

Nothing here imports Triton: every ``model_repository/*/1/model.py`` is a thin
adapter that hands numpy arrays to the handlers defined in these modules
(see python_backends.serving). The modules are unit-tested without a server.
"""
