"""``python -m dilated_attn``: inspect the installed plugins."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dilated_attn.registry import get_registry


def _plugins(as_json: bool) -> int:
    registry = get_registry()
    rows: list[dict[str, Any]] = []
    for name, backend in sorted(registry.backends().items()):
        rows.append(
            {
                "kind": "attention",
                "name": name,
                "plugin": backend.source.plugin,
                "distribution": backend.source.distribution or "-",
                "version": backend.source.version or "-",
                "capabilities": backend.capabilities.as_dict(),
            }
        )
    for name, pool in sorted(registry.pools().items()):
        rows.append(
            {
                "kind": "pool",
                "name": name,
                "plugin": pool.source.plugin,
                "distribution": pool.source.distribution or "-",
                "version": pool.source.version or "-",
                "capabilities": dict(pool.capabilities),
            }
        )
    failures = [
        {
            "plugin": f.source.plugin,
            "distribution": f.source.distribution or "-",
            "version": f.source.version or "-",
            "stage": f.stage,
            "error": f.error,
        }
        for f in registry.failures()
    ]
    if as_json:
        print(json.dumps({"registered": rows, "failed": failures}, indent=2, default=str))
        return 0
    headers = ("kind", "name", "distribution", "version", "capabilities")
    table = [
        (
            r["kind"],
            r["name"],
            r["distribution"],
            r["version"],
            ", ".join(f"{k}={v}" for k, v in r["capabilities"].items()),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(str(row[i])) for row in table)) for i, h in enumerate(headers[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  " + headers[-1])
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    for f in failures:
        print(
            f"failed  {f['plugin']}  {f['distribution']}  {f['version']}  skipped: {f['stage']} failed: "
            f"{f['error']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dilated_attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list attention backends and buffer pools with their sources")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "plugins":
        return _plugins(args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
