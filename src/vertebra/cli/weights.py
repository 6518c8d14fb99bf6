"""``vertebra weights list [NAME...] | download NAME... | path NAME``: the published weights of the networks.

``list``: what exists (every network with weights, or every set of the networks named), its source tag,
the accuracy its source reports, the size, the license and whether it is in the cache (``--json`` for a
script). ``download``: fetch into the cache ahead of time (to prepare an offline machine: copy the cache
folder, or set ``VERTEBRA_HOME``). ``path``: where a file lives, or must be placed by hand, in the cache.
"""

from __future__ import annotations

import json

from ._console import console, print_error

__all__ = ["register", "cmd_weights"]

EXIT_ERROR = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="published weights: list, download (for offline use), path",
                              description="The published (torchvision, timm) weights of vertebra's networks and "
                                          "detectors, and the download cache ($VERTEBRA_HOME/weights).")
    sub = p.add_subparsers(dest="weights_command", required=True)
    ls = sub.add_parser("list", help="the weights that exist (all networks, or every set of NAME...)")
    ls.add_argument("names", nargs="*", metavar="NAME", help="networks (default: one line per network with weights)")
    ls.add_argument("--json", action="store_true", help="print JSON (every field of every set) instead of a table")
    ls.set_defaults(handler=cmd_weights)
    dl = sub.add_parser("download", help="download weights into the cache (to prepare an offline machine)")
    dl.add_argument("names", nargs="+", metavar="NAME", help="networks (or detectors: retinanet_resnet50_fpn_v2)")
    dl.add_argument("--tag", default=None, help="one set (e.g. timm:a1_in1k); default: each network's best")
    dl.add_argument("--all", action="store_true", help="every set of each network, not only its best")
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    dl.set_defaults(handler=cmd_weights)
    pa = sub.add_parser("path", help="the cache path of a network's weights file (where to place it by hand)")
    pa.add_argument("names", nargs=1, metavar="NAME")
    pa.add_argument("--tag", default=None, help="one set (e.g. timm:a1_in1k); default: the network's best")
    pa.set_defaults(handler=cmd_weights)


def _known(name: str) -> None:
    """A registry name or a detector weights name; else the registry's KeyError (with close matches)."""
    from .. import hub
    from ..registry import backbone_spec

    if not hub.has_weights(name):
        backbone_spec(name)


def _size(w) -> str:
    return "" if w.file_size_mb is None else f"{w.file_size_mb:.1f}"


def _metric(w) -> str:
    if w.top1 is not None:
        return f"{w.top1:.3f}"
    if "box_ap" in w.metrics:
        return f"AP {w.metrics['box_ap']:.1f}"
    return ""


def _list(names: list[str], as_json: bool) -> None:
    from rich.table import Table

    from .. import hub

    for n in names:
        _known(n)
    rows = [w for n in names for w in hub.list_weights(n)] if names else hub.list_weights()
    if as_json:
        out = []
        for w in rows:
            d = {f: getattr(w, f) for f in w.__dataclass_fields__}
            d.update(top1=w.top1, cached=hub.is_cached(w), path=str(hub.cached_path(w)))
            out.append(d)
        print(json.dumps(out, indent=1))
        return
    if names:
        missing = [n for n in names if not hub.has_weights(n)]
        table = Table(title=f"published weights of {', '.join(names)}", header_style="bold")
        for col in ("network", "tag", "default", "top-1 / AP", "eval size", "MB", "license", "cached"):
            table.add_column(col, no_wrap=col in ("network", "tag"))
        for w in rows:
            table.add_row(w.network, w.tag, "yes" if w.default else "", _metric(w), str(w.input_size[-1]), _size(w),
                          w.license, "yes" if hub.is_cached(w) else "")
        for n in missing:
            table.add_row(n, "[dim]none published (torchvision, timm)[/]", "", "", "", "", "", "")
    else:
        nets: dict[str, list] = {}
        for w in rows:
            nets.setdefault(w.network, []).append(w)
        table = Table(title=f"{len(nets)} networks with published weights ({len(rows)} sets; "
                            f"vertebra weights list NAME for all of one network's)", header_style="bold")
        for col in ("network", "best", "top-1 / AP", "sets", "sources", "cached"):
            table.add_column(col, no_wrap=col in ("network", "best"))
        for net, ws in nets.items():
            best = ws[0]
            sources = ", ".join(sorted({w.source for w in ws}))
            cached = sum(hub.is_cached(w) for w in ws)
            table.add_row(net, best.tag, _metric(best), str(len(ws)), sources, str(cached) if cached else "")
    console.print(table)
    console.print(f"cache: {hub.cache_dir()}", highlight=False, soft_wrap=True)


def _chosen(names: list[str], tag: str | None, every: bool):
    from .. import hub

    out = []
    for n in names:
        _known(n)
        if every:
            if not hub.has_weights(n):
                hub.get_weights(n)  # the "no published weights" error
            out.extend(hub.list_weights(n))
        else:
            out.append(hub.get_weights(n, True if tag is None else tag))
    return out


def cmd_weights(args) -> int:
    from .. import hub

    try:
        if args.weights_command == "list":
            _list(args.names, args.json)
        elif args.weights_command == "path":
            (w,) = _chosen(args.names, args.tag, False)
            print(hub.cached_path(w))
        else:
            for w in _chosen(args.names, args.tag, args.all):
                path = hub.download(w, force=args.force)
                console.print(f"{w.network} {w.tag}: {path}", highlight=False, soft_wrap=True)
    except (hub.WeightsError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print_error(msg)
        return EXIT_ERROR
    return 0
