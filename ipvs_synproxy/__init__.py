"""ipvs-synproxy's control plane: what runs on a production balancer.

Data flows one way, and the packages are its floors (each may import only the
floors below it; ``tests/unit/test_layout.py`` holds the tree to this):

* :mod:`ipvs_synproxy.kernel` — the kernel's interface: model types, the
  generic-netlink client, sysctls, counters, the SYN-cookie reference.
* :mod:`ipvs_synproxy.config` — the declarative file: load and validate,
  diff/plan/apply against the kernel, keepalived.conf rendering.
* :mod:`ipvs_synproxy.adm` — ipvsadm's command line and listing formats.
* :mod:`ipvs_synproxy.exporter` — the Prometheus exporter: every series it
  serves (the contract of ``monitoring/`` and the console), read from the
  kernel floor only, never from the config floor that holds the secret.
* :mod:`ipvs_synproxy.build` — building the patched modules, toa.ko and
  keepalived; the DKMS tree; installing Debian packages.
* :mod:`ipvs_synproxy.cli` — the ``ipvs-synproxy`` command: the top floor, the
  only one that may dispatch to the console (:mod:`webui`) and the testbed
  (:mod:`ipvs_synproxy_testbed`, which is not part of the product).
"""
