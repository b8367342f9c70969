"""`optimodel demo`: the whole product on one machine, in about three minutes.

    1. data    train the digits CNN (scikit-learn's 8x8 digits)
    2. build   FP32 baseline, then prune + distill → INT8 → accuracy gate → profile
    3. serve   the optimized engine on 127.0.0.1, autotune on with a p99 SLO
    4. load    open-loop load low → high → low; every tuner decision printed
    5. report  table per phase, report.json and report.png in the demo's folder
    then serve until Ctrl-C (--once: exit).

Ctrl-C at any point stops every process the demo started, removes what was half
written, and exits 130 with one line naming the part it interrupted.
"""
