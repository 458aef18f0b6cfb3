"""The ``ipvs-synproxy`` command, one module per command group.

``main`` (the parser, ``kmod`` and ``vm``), ``config`` (diff, apply, stats,
sysctl) and ``keepalived`` (render, build). The top floor: it may import every
package of the product, the console (:mod:`webui`) and, for ``vm exec`` only,
the testbed.
"""
