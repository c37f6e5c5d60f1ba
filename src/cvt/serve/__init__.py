"""`cvt serve`: a CvT behind HTTP, on the Open Inference Protocol (KServe V2) and a `/predict` route.

Modules, one job each: `protocol` (the V2 infer body, JSON and binary), `batcher` (dynamic batching on a worker
thread), `runner` (the model, its preprocessing and attention maps), `metrics` (Prometheus), `page` (the web page),
`app` (the Starlette routes, which need the `serve` extra). Nothing is imported here, so `import cvt.serve` is
light; `cvt.serve.app.create_app(ServedModel(model, name))` builds the ASGI application.
"""
