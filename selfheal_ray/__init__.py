"""selfheal on Ray Serve: an ingress deployment for any selfheal archive (dynamic batching, the
`X-Selfheal` header as on TorchServe) and a one-replica learner deployment with the feedback,
status and quarantine routes (`selfheal_ray.app`)."""
