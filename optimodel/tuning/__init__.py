"""The latency-SLO tuner shared by the operator and `optimodel run`.

One pure policy (policy.decide) fed by two sources of the same Observation:
Prometheus in a cluster (prometheus.py), a server's own /metrics on one machine
(scrape.py). Light imports only: httpx and prometheus_client's text parser.
"""
