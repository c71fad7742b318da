"""kopf handlers: decorators only. They collect what kopf gave and call `reconcile`."""
