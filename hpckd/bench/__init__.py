"""`hpckd bench`: throughput suites, each with its baseline measured in the same run."""
