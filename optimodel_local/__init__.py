"""Optimodel on one machine: `optimodel run` (build as a local process, serve on 127.0.0.1) and
`optimodel demo`. Kept out of `optimodel`, which holds the contract types every component imports."""
