"""Building what the balancer loads: the patched IPVS modules, toa.ko, keepalived.

``kmod`` (the kernel series applied to Debian's sources and built out of
tree; checkpatch; the DKMS tree), ``keepalived`` (keepalived with this
project's patches), ``apt`` (install missing Debian packages; every caller
passes its own list) and ``paths`` (the checkout and its build cache).

May import: nothing else of the project.
"""
