"""The recursive loop: arms, arcs, baselines, scheduler, collapse guard, resume."""
