"""ipvsadm compatibility: ``ipvs-synproxy adm …`` and ``ipvsadm-sp``.

``command`` (the parsed command and its output format), ``cmdline`` (ipvsadm
1.31's option rules: one command line in, an :class:`~command.AdmCommand` or a
usage error out), ``listing`` (``-L``/``-S``/``-c`` formats byte for byte: pure
functions of model values) and ``execute`` (running a command through the
netlink client).

May import: :mod:`ipvs_synproxy.kernel`.
"""
