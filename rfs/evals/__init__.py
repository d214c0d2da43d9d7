"""Evaluation: metrics schemas, held-out probes, the drift alarm, the verdict and the report."""
