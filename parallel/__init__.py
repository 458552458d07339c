"""How nets are spread over devices: the backend surface and its implementations (docs/parallelism.md)."""
