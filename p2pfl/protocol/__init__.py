"""Sans-I/O protocol cores: fed events, they return actions. Drivers (simulator, daemon)
perform the actions; no protocol decision is made outside this package."""
