"""``mmfuse eval``: fusion beyond accuracy, measured on a running server.

* ``corruptions``: imperfections at levels p in [0, 1] (image, text, modality dropout), seeded;
* ``metrics``: accuracy per kind, balanced accuracy, area under the curve, effective robustness,
  retention, catastrophic-degradation flags, the single-modality logistic regressions (numpy only);
* ``serving``: the trained heads in a repository, serving each in turn (parameters only), sending rows;
* ``robustness``: every head under every imperfection through ``fuse_image_text``;
* ``load``: closed- and open-loop load, bounded, with Triton's statistics and server memory; the load runs
  are Triton's perf_analyzer's (mmfuse.perf_analyzer), or mmfuse.loadgen's asyncio client with
  ``--load-generator python``; every run records which made it (``load_generator``);
* ``perf_analyzer``: the same load as perf_analyzer input files and command lines, to rerun by hand;
* ``report``: report.json, report.md and the PNG plots; ``runner``: the whole run.
"""
