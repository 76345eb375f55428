"""trioproxy's benchmark: ``python -m bench [--quick] [--out DIR]`` (see docs/performance.md).

- ``loadgen``: the load generator (its own process, stdlib only);
- ``servers``: start and stop nginx, the demo backend, the bare-ASGI ceiling and proxies;
- ``scenarios``: scenarios 3a-3i of issue 5, each proxy figure next to the direct figure;
- ``rounds``: alternated rounds for ``--compare`` (orders, medians, paired ratios; pure);
- ``report``: the targets table, the JSON file and the plots.
"""
