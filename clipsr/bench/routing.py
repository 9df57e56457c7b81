"""Measurements of ``--route auto`` without CLIP weights (docs/benchmarks.md, "Routing").

``python -m clipsr.bench.routing`` with one of:

- ``inputs``: the unseen images of each domain folder (after the shots, in sorted order) as the
  protocol's bicubic LR, one folder per domain, so the first folder of a key is its truth;
- ``check``: fit each domain's routing data on its shots and route its unseen images, with no Ray,
  no model and no registry: the decision ``--route auto`` makes, and the leave-one-out confusion;
- ``count``: a run's manifest ``domain`` column against that truth;
- ``constants``: the descriptor's standardisation constants from the source-domain photos (how
  clipsr.routing_descriptor's CENTRE and SCALE were measured).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from clipsr import domain_routing as dr
from clipsr import imaging, storage
from clipsr import routing_descriptor as rd
from clipsr.adapt.routing_fit import degrade, fit_domain


def _read(uri: str) -> np.ndarray:
    return imaging.to_rgb(imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri)))


def _folders(pairs: Sequence[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pairs)


def make_inputs(folders: dict[str, str], out: str, shots: int, take: int, scale: int) -> int:
    """Write ``out/<domain>/<name>.png`` for the ``take`` images after the ``shots``; returns how many."""
    count = 0
    for name, folder in folders.items():
        for uri in storage.list_images(folder)[shots:shots + take]:
            stem = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            buf = io.BytesIO()
            Image.fromarray(degrade(_read(uri), scale)).save(buf, "PNG")
            storage.write_bytes_atomic(f"{out}/{name}/{stem}.png", buf.getvalue())
            count += 1
    return count


def check(folders: dict[str, str], shots: int, take: int, scale: int) -> dict[str, Any]:
    """Route the unseen images of each folder among the domains fitted on the shots."""
    domains, unseen = {}, {}
    for name, folder in folders.items():
        uris = storage.list_images(folder)
        block, _ = fit_domain([degrade(_read(u), scale) for u in uris[:shots]], scale, {"arch": rd.ARCH})
        domains[name] = dr.DomainRouting.from_entry({"routing": block})
        unseen[name] = uris[shots:shots + take]
    names = sorted(domains)
    encoder = dr.encoder_for(domains[names[0]].encoder)
    counts = {n: dict.fromkeys(names + [dr.DEFAULT_DOMAIN], 0) for n in names}
    rows = []
    for truth, uris in unseen.items():
        for uri in uris:
            d = dr.decide(encoder.embed(degrade(_read(uri), scale)), [domains[n] for n in names])
            got = dr.DEFAULT_DOMAIN if d.chosen is None else names[d.chosen]
            counts[truth][got] += 1
            rows.append({"uri": uri, "truth": truth, "domain": got, "similarity": round(d.similarity, 4),
                         "runner_up": None if d.runner_up is None else names[d.runner_up],
                         "margin": None if d.margin is None else round(d.margin, 4)})
    return {"descriptor": dr.describe_encoder(encoder.identity_dict), "counts": counts,
            "right": sum(counts[n][n] for n in names), "routed": len(rows),
            "loo_confusion": dr.confusion(domains), "rows": rows}


def count_manifest(run_uri: str) -> dict[str, Any]:
    """The ``domain`` column of a run's manifest against the first folder of each key."""
    from clipsr.enhance import manifest

    rows = [r for part in manifest.iter_parts(run_uri)
            for r in manifest.read_part(part, ["input_key", "domain", "route_similarity", "route_runner_up",
                                               "route_margin", "status"]).to_pylist()]
    pairs = Counter(f"{r['input_key'].split('/', 1)[0]} -> {r['domain']}" for r in rows)
    right = sum(r["input_key"].split("/", 1)[0] == r["domain"] for r in rows)
    close = sorted((r for r in rows if r["route_margin"] is not None), key=lambda r: r["route_margin"])[:5]
    wrong = [r for r in rows if r["input_key"].split("/", 1)[0] != r["domain"]]
    return {"routed": dict(sorted(pairs.items())), "right": right, "rows": len(rows),
            "statuses": dict(Counter(r["status"] for r in rows)), "misrouted": wrong, "closest": close}


def constants(folders: Sequence[str], scale: int) -> dict[str, list[float]]:
    """Median and IQR/1.349 of each transformed statistic over the photos in ``folders``."""
    from clipsr.degrade import make_lr, modcrop

    rows = [rd.transform(rd.statistics(make_lr(modcrop(_read(u), scale), scale)))
            for folder in folders for u in storage.list_images(folder)]
    table = np.array(rows)
    q75, q25 = np.percentile(table, [75, 25], axis=0)
    return {"photos": len(rows), "centre": [float(f"{v:.4g}") for v in np.median(table, axis=0)],
            "scale": [float(f"{v:.4g}") for v in (q75 - q25) / 1.349]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipsr.bench.routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("inputs", "check"):
        q = sub.add_parser(name)
        q.add_argument("--data", action="append", required=True, metavar="DOMAIN=FOLDER")
        q.add_argument("--shots", type=int, default=10)
        q.add_argument("--take", type=int, default=25, help="unseen images per domain after the shots")
        q.add_argument("--scale", type=int, default=4)
        if name == "inputs":
            q.add_argument("--out", required=True)
    q = sub.add_parser("count")
    q.add_argument("manifest_run", help="a run's manifest folder, .../_manifests/run=<id>")
    q = sub.add_parser("constants")
    q.add_argument("folders", nargs="+")
    q.add_argument("--scale", type=int, default=4)
    args = p.parse_args(argv)
    if args.what == "inputs":
        print(f"{make_inputs(_folders(args.data), args.out, args.shots, args.take, args.scale)} LR images in {args.out}")
        return 0
    if args.what == "check":
        result = check(_folders(args.data), args.shots, args.take, args.scale)
        print(dr.format_confusion(result["loo_confusion"]))
        for row in result["rows"]:
            if row["domain"] != row["truth"]:
                print(f"  misrouted {row['uri']}: {row['domain']} (similarity {row['similarity']}, "
                      f"runner-up {row['runner_up']}, margin {row['margin']:+.3f})")
        print(f"unseen images routed: {json.dumps(result['counts'])}; right {result['right']} of {result['routed']}")
        return 0
    if args.what == "count":
        print(json.dumps(count_manifest(args.manifest_run), indent=1, default=str))
        return 0
    print(json.dumps(constants(args.folders, args.scale)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
