"""kubetune operator: turns FineTuneJobs into trainer pods, status and inference endpoints."""

__version__ = "0.1.0"
