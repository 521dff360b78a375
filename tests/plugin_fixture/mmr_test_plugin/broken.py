raise ImportError("mmr_test_plugin.broken is broken on purpose (needs a package that is not installed)")
