"""The declarative config file: what an operator writes, and how it reaches the kernel.

``reader`` (YAML with line numbers and the field checks), ``state`` (the
desired/current state types), ``load`` (the file's services, sysctls and cookie
secret), ``keepalived_settings`` (the file's ``keepalived:`` section),
``xdp_settings`` (its ``xdp:`` interfaces), ``plan`` (diff, plan and apply
against the kernel, with rollback; ``fastpath`` reads and drives the XDP
programs for it) and ``keepalived``
(keepalived.conf rendering; its Jinja2 templates are package data).

May import: :mod:`ipvs_synproxy.kernel`.
"""
