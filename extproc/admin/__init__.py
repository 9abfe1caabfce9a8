"""The admin API (``budget_router.admin.v1.Admin``): the calibration, B_short,
config reload and snapshots of a running router. ``service`` holds the
handlers (served by ``extproc.serve``), ``reflection`` gRPC server reflection,
``cli`` the ``status`` / ``admin`` commands, ``generate`` the stub generator
for ``v1/`` (generated code, checked fresh by a test).

May import: ``extproc.core`` (to read and change the router it serves),
``extproc.config``/``defaults``, grpc. Must not import ``extproc.tools`` or
``extproc.cli``.
"""
