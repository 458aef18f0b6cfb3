"""The declarative config file: what an operator writes, and how it reaches the kernel.

``reader`` (YAML with line numbers and the field checks), ``state`` (the
desired/current state types), ``load`` (the file's services, sysctls and cookie
secret), ``keepalived_settings`` (the file's ``keepalived:`` section), ``plan``
(diff, plan and apply against the kernel, with rollback) and ``keepalived``
(keepalived.conf rendering; its Jinja2 templates are package data).

May import: :mod:`ipvs_synproxy.kernel`.
"""
