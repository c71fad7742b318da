"""kopf handlers. `jobs` and `pods` hold the decorators; `controller` the reconcile logic."""
