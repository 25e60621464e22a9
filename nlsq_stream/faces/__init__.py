"""The public calls, on top of the flow: each checks its arguments, then drives the stages.

``sync`` holds ``least_squares`` and ``curve_fit`` (scipy's calls; ``verbose`` and ``sinks``
watch them), ``streaming`` holds ``fit_stream`` and ``least_squares_stream`` (the async face).
Two faces of one pipeline, as httpx has ``Client`` and ``AsyncClient``. This is the only layer
that imports the solver, the stream and the sinks together; nothing in the package imports it
but ``nlsq_stream/__init__.py`` and the tools (``cli``, ``benchmarks``).
"""
