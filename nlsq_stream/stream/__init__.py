"""Stage two: the stream. Records leave the device, become events, and reach each subscriber.

It owns the emitter (``emitter``: the record buffer compiled into a watched loop, and the host
loop that runs a fit in chunks), the hub (``hub``: thread-safe fan-out of event batches to one
memory object stream per subscriber), the pipeline that runs a watched fit and publishes its
events (``pipeline``), the sink runner (``runner``: sinks as tasks of a shared background loop)
and ``FitStream`` (``fit_stream``: a fit read with ``async for``). It may import the solver, the
events, ``_result``, ``_control`` and ``_exceptions``; it knows no sink by name (the faces pass
in the default display).
"""
