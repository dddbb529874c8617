"""`python -m operators`: hold the operator Lease, then run the kopf operator in one namespace."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

import kopf

from operators import handlers  # noqa: F401  (registers the kopf handlers)
from operators.handlers import ALLOWED_IMAGES_ENV, build_settings
from operators.leader import RENEW_SECONDS, LeaseHolder


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m operators", description=__doc__)
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="namespace to serve (default: $POD_NAMESPACE)")
    p.add_argument("--lease", default="ringpilot-operator", help="Lease name")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="this replica's name in the Lease (default: $POD_NAME)")
    p.add_argument("--liveness", default=None, help="kopf liveness endpoint, e.g. "
                   "http://0.0.0.0:8080/healthz")
    p.add_argument("--allowed-image", action="append", default=None, metavar="IMAGE",
                   help="an image StagedTrainings may run, NAME:TAG or NAME@sha256:DIGEST "
                   "(repeatable; default: $RINGPILOT_ALLOWED_IMAGES, else the operator's own "
                   "image)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if not args.namespace:
        print("python -m operators: give --namespace or set POD_NAMESPACE", file=sys.stderr)
        return 2
    if args.allowed_image:  # the handlers read the allow-list from the environment
        os.environ[ALLOWED_IMAGES_ENV] = ",".join(args.allowed_image)
    try:  # a bad setting stops the operator here, not in its first reconcile
        build_settings()
    except ValueError as e:
        print(f"python -m operators: bad setting (--allowed-image, ${ALLOWED_IMAGES_ENV} or "
              f"$RINGPILOT_*_SECONDS): {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    holder = LeaseHolder(handlers._api(), args.namespace, args.lease, args.identity)
    while not holder.try_hold():
        logging.info("lease %s held by another operator; waiting", args.lease)
        time.sleep(RENEW_SECONDS)
    stop = threading.Event()
    threading.Thread(target=holder.keep, args=(stop,), daemon=True).start()
    try:
        kopf.run(standalone=True, namespaces=[args.namespace], clusterwide=False,
                 liveness_endpoint=args.liveness)
    finally:
        stop.set()
        holder.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
