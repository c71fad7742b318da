"""CLI: ``python -m tests.cluster up|down|status --dir DIR``.

Why: the same cluster the tests use, by hand.  ``up`` prints exactly two lines,
``KUBECONFIG=<path>`` and ``KUBECTL=<path>`` (so ``eval "$(... up ...)"`` works), and
returns with the processes running detached; ``down`` stops exactly those processes.
"""

from __future__ import annotations

import argparse
import json
import sys

from tests.cluster.controlplane import ClusterError, ControlPlane


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane, fake GPU nodes and the node agent")
    up.add_argument("--dir", required=True, help="state dir (logs, pki, pods, kubeconfig)")
    up.add_argument("--nodes", type=int, default=2, help="number of fake GPU nodes")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--no-build", action="store_true", help="fail instead of building binaries")
    up.add_argument("--timeout", type=float, default=180)
    for name in ("down", "status"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True)
    args = p.parse_args(argv)

    try:
        if args.cmd == "up":
            cp = ControlPlane(
                args.dir,
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                build=not args.no_build,
            )
            cp.start(timeout=args.timeout)
            print(f"KUBECONFIG={cp.kubeconfig}")
            print(f"KUBECTL={cp.kubectl_path}")
        elif args.cmd == "down":
            ControlPlane.load(args.dir).stop()
        else:
            cp = ControlPlane.load(args.dir)
            print(
                json.dumps(
                    {
                        n: {"pid": r.pid, "alive": r.alive(), "log": r.log}
                        for n, r in cp.state.procs.items()
                    },
                    indent=2,
                )
            )
    except (ClusterError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
