"""The application layer on top of compile/run/deploy: ``video`` (a model over a video file,
as a pipeline of threads, locally, on one device or over a device pool) and ``report``
(devices and model variants side by side, as a static HTML page and JSON)."""
