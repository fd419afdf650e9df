"""Graph rewrites, one a file, each ``Model -> Model`` with its mathematics in its docstring.

Installed as ``lrdeploy.passes``. Low-rank factorizations are rule objects (``Factorization``
subclasses in ``base``) that the plan applier dispatches to by method name.
"""
