"""End to end: FineTuneJobs through the operator on the test cluster."""
