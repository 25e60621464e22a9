"""Stage one: the solver. Model and data in, ``OptimizeResult`` out; the loop runs on the device.

It owns argument checks (``validate``), robust losses (``losses``), the trust-region
subproblems (``trust_region``), the jitted TRF and LM loop (``engine``), and the preparation of
``least_squares`` and ``curve_fit`` calls into a ``PreparedFit`` that runs silently (``fit``).
It may import only ``nlsq_stream._result``: it knows nothing of events, streams or sinks. A
watcher reaches into the loop only through ``engine.Config.emitter``, an object of the
``engine.Recorder`` protocol that the stream stage passes in.
"""
