"""Switch the tier of the DyCE Serve instance this runs beside, from inside its container.

Standard library only, so it runs in the service image unchanged, fed on standard input; the
admin token never leaves the container because it is read from the container's own
environment (DYCE_ADMIN_TOKEN, DYCE_PORT):

    docker-compose exec -T dyce python - --lambda 0.3 < deploy/switch_tier.py
    for pod in $(kubectl -n dyce get pods -l app.kubernetes.io/name=dyce-serve -o name); do
        kubectl -n dyce exec -i "$pod" -- python - --lambda 0.3 < deploy/switch_tier.py
    done

A switch pins the instance (manual mode); ``--auto`` hands it back to the autoswitcher. Prints
the service's answer (the active tier) as one JSON line; exits 1 with the service's error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('DYCE_PORT', '8000')}")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--lambda", dest="lam", type=float, help="bank entry with the nearest lambda")
    choice.add_argument("--index", type=int, help="bank entry by index")
    choice.add_argument("--max-relative-macs", type=float, help="most accurate entry within this compute")
    choice.add_argument("--min-accuracy", type=float, help="cheapest entry reaching this accuracy")
    choice.add_argument("--auto", action="store_true", help="hand the tier back to the autoswitcher")
    return parser.parse_args(argv)


def request_for(args: argparse.Namespace) -> tuple[str, dict]:
    if args.auto:
        return "/admin/mode", {"mode": "auto"}
    selectors = {"lambda": args.lam, "index": args.index}
    selectors |= {"max_relative_macs": args.max_relative_macs, "min_accuracy": args.min_accuracy}
    return "/admin/active", {key: value for key, value in selectors.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.get("DYCE_ADMIN_TOKEN", "")
    if not token:
        print("switch_tier: DYCE_ADMIN_TOKEN is not set in this environment", file=sys.stderr)
        return 1
    path, body = request_for(args)
    request = urllib.request.Request(
        args.url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as err:
        print(f"switch_tier: {err.code} {err.read().decode()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
