"""Pure functions: FineTuneJob -> manifests and trainer config. No I/O, no cluster client."""
