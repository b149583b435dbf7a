"""`python -m selfheal_ray deploy --mar X.mar [--replicas 2]`: deploy a selfheal archive on the running
Ray cluster (`ray start --head` first): `/predictions/{model}` and `/feedback/{model}` on Serve's HTTP
proxy. The learner's key comes from $SELFHEAL_MANAGEMENT_KEY."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("selfheal.ray")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfheal_ray", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    dep = sub.add_parser("deploy", help="deploy an archive's ingress and learner on the running cluster")
    dep.add_argument("--mar", required=True, help="a .mar from `selfheal archive` (a path every node can read)")
    dep.add_argument("--replicas", type=int, default=2)
    dep.add_argument("--workdir", default=".", help="where a relative snapshot_dir lives")
    dep.add_argument("--address", default="auto", help="the cluster (default: the one `ray start` began here)")
    dep.add_argument("--host", default="127.0.0.1", help="Serve's HTTP proxy address (0.0.0.0 to serve others)")
    dep.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import ray
    from ray import serve

    from selfheal_ray.app import deploy

    ray.init(address=args.address, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        name = deploy(args.mar, replicas=args.replicas, workdir=args.workdir)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    log.info("selfheal on Ray Serve: http://%s:%d/predictions/%s and /feedback/%s", args.host, args.port, name, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
