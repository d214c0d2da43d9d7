"""One wave: N rollouts over the slots, one trace row each, exactly once, resumable after kill -9."""
