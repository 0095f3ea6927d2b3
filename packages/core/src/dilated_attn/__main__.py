"""``python -m dilated_attn``: inspect the installed plugins and the metadata cache."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

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


def _cache(as_json: bool) -> int:
    from dilated_attn.cache import REGION_STATS_KEYS, cache_stats

    get_registry()  # plugins loaded, so the cache's ledger is the one the library would use
    try:
        stats = cache_stats()
    except ValueError as exc:  # a bad DILATED_ATTN_CACHE_BYTES: one line, not a traceback
        print(f"python -m dilated_attn cache: error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"metadata cache: ledger={stats['ledger']} budget_bytes={stats['budget_bytes']}")
    rows = [(name, *(str(r[k]) for k in REGION_STATS_KEYS)) for name, r in stats["regions"].items()]
    rows.append(("total", *(str(stats["total"][k]) for k in REGION_STATS_KEYS)))
    headers = ("region", *REGION_STATS_KEYS)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"peak_bytes={stats['total']['peak_bytes']} (this process)")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m dilated_attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list attention backends and buffer pools with their sources")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cache = sub.add_parser("cache", help="the metadata cache's budget, ledger and per-region stats")
    cache.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "plugins":
        return _plugins(args.json)
    if args.command == "cache":
        return _cache(args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
