// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only module: emits one kernel WARNING when loaded, so the testbed's
 * own tests can check that a guest kernel complaint fails a run.
 */
#include <linux/module.h>
#include <linux/bug.h>

static int __init sp_warn_init(void)
{
	WARN(1, "ipvs-synproxy testbed: deliberate warning\n");
	return 0;
}

static void __exit sp_warn_exit(void)
{
}

module_init(sp_warn_init);
module_exit(sp_warn_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ipvs-synproxy testbed self-test: WARN on load");
