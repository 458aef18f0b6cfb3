"""The kernel's interface: everything that speaks to the patched IPVS.

``model`` (the values: services, real servers, local addresses, counters),
``netlink`` (the generic-netlink client; nothing outside this package speaks
netlink), ``netns`` (sockets and files inside a network namespace),
``sysctl`` (the ``net.ipv4.vs.*`` knobs), ``stats`` (counter readings and
rates) and ``cookie`` (a bit-exact reference of the kernel's SYN cookies).

May import: nothing else of the project.
"""
