"""Runs every query of deploy/grafana/threadline.json against a Prometheus and prints
what each returns: the dashboard's panels, without Grafana.

    python scripts/dashboard_queries.py [--prometheus http://127.0.0.1:9090] [--window 1m]

`$__rate_interval` becomes `--window` and `$service` matches every service. A query
Prometheus refuses is printed as ERROR and makes the exit status 1; a query with no
series yet (no retries, no memory job so far) is printed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "threadline.json"


def query(prometheus: str, expr: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        result: list[dict[str, object]] = json.load(reply)["data"]["result"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--window", default="1m")
    args = parser.parse_args()
    failed = 0
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", args.window)
            expr = expr.replace("$service", ".*")
            try:
                series = query(args.prometheus.rstrip("/"), expr)
            except urllib.error.HTTPError as exc:
                failed += 1
                print(f"ERROR {panel['title']}: {exc.read().decode()[:200]}")
                continue
            shown = ", ".join(
                f"{json.dumps(s['metric'], sort_keys=True)}={s['value'][1]}"  # type: ignore[index]
                for s in series[:3]
            )
            print(f"{panel['title']} [{target['legendFormat']}]: {shown or 'no series yet'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
