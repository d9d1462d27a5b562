"""Reduction: the run record, the completeness check, the merge into a dataset, and the exports."""
