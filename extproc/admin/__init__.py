"""The admin API (``budget_router.admin.v1.Admin``): the calibration, B_short,
config reload and snapshots of a running router. ``service`` holds the
handlers, ``plane`` serves them on the admin port (apart from ext_proc, with
health and reflection; started by ``extproc.serve``), ``auth`` the bearer
token and where the plane may listen, ``warm`` the warm start from peers,
``reflection`` gRPC server reflection for the ext_proc port, ``cli`` the
``status`` / ``admin`` commands, ``generate`` the stub generator for ``v1/``
(generated code, checked fresh by a test).

May import: ``extproc.core`` (to read and change the router it serves),
``extproc.config``/``defaults``, ``extproc.dns``/``tls``, grpc. Must not import
``extproc.serve`` (which starts this plane), ``tools`` or ``cli``.
"""
