"""The QEMU testbed: not part of the product, never packaged.

``vm`` boots Debian's stock kernel under QEMU with this project's modules
(``ipvs-synproxy vm exec``, the contract in DESIGN.md), ``initramfs`` builds
the guest's root, ``topology`` the client/lb/rs1/rs2 namespaces, ``peers``,
``transfer`` and ``flood`` are the test traffic, ``demo`` is ``make demo``,
``junit`` summarises a guest run, ``deps`` is ``make deps``.

May import: :mod:`ipvs_synproxy.kernel`, :mod:`ipvs_synproxy.adm`,
:mod:`ipvs_synproxy.build`; never the console, bench or tests.
"""
