"""`kubetune validate FILE...`: check job YAMLs with no cluster and no trainer runtime."""

from __future__ import annotations

import argparse

from kubetune_operator.api.validation import SpecError, load_jobs


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            jobs = load_jobs(name)
        except SpecError as err:
            failed += 1
            print(f"{name}: INVALID ({len(err.errors)} error{'s' if len(err.errors) > 1 else ''})")
            for e in err.errors:
                print(f"  - {e}")
            continue
        names = ", ".join(j.metadata.name for j in jobs)
        print(f"{name}: valid ({names})")
    return 1 if failed else 0
