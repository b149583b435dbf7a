"""selfheal's server-neutral glue: what every server adapter (TorchServe, KServe, Ray Serve) shares.

- `runtime.ReplicaRuntime`: one replica's serving, monitoring, prediction record and
  published-version following, built from plain values;
- `learner.start_learner`: a model's learner (intake HTTP + the loop that learns) as one call;
- `settings.HandlerSettings`: the `handler:` section of a model-config, checked whole;
- `parsing`: request bodies (JSON with limits, instances as tensors);
- `header`: the `X-Selfheal` contract; `bundle`: a model's files (a .mar or its unpacked folder).

Nothing here imports a server.
"""
