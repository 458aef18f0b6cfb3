"""The Prometheus exporter: ``ipvs-synproxy exporter`` and the console's ``/metrics``.

``series`` (every series served: names, types, help, labels, the flood
threshold), ``collector`` (one kernel read turned into those series) and
``serve`` (the HTTP endpoint, loopback by default).

May import: :mod:`ipvs_synproxy.kernel` only. Not the config floor, where the
cookie secret is read: the exporter shows the key's epoch, never the secret.
"""
