"""selfheal on KServe: `SelfHealModel` (v1 and Open Inference Protocol v2, REST and gRPC) and the
commands that serve an archive and run its learner (`python -m selfheal_kserve serve|learner`).
Manifests for a cluster are under `deploy/kserve/`."""
