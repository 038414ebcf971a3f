"""services: Ray Serve generation on one shared base with hot-loaded concept adapters."""
