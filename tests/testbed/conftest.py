"""Host-side tests of the build pipeline and the testbed itself.

They build modules and boot guests, so they run in ``make test`` (target
``testbed-test``) but not in the fast unit suite.
"""
