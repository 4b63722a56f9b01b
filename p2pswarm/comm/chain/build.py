"""Compile SwarmCoordinator.vy into artifacts/SwarmCoordinator_p2pswarm.json (ABI + bytecode): a development
step, run after editing the contract and committed with it, so that nodes never need a compiler.

    python -m p2pswarm.comm.chain.build          # needs vyper==0.4.3 (pip install 'vyper==0.4.3')
    python -m p2pswarm.comm.chain.build --check  # exit 1 if the shipped artifact is not of this source

Vyper's ABI has no `error` entries (it reverts with raw 4-byte selectors), so the custom errors the
contract raises are added to the ABI here: the client decodes a revert by the selectors of the ABI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "SwarmCoordinator.vy"
ARTIFACT = HERE / "artifacts" / "SwarmCoordinator_p2pswarm.json"
VYPER = "0.4.3"


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def build() -> dict:
    import vyper

    if vyper.__version__.split("+")[0] != VYPER:
        raise SystemExit(f"vyper {VYPER} is needed (found {vyper.__version__}): pip install 'vyper=={VYPER}'")
    source = SOURCE.read_text()
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    errors = sorted(set(re.findall(r'method_id\("(\w+)\(\)"', source)))
    abi = out["abi"] + [{"type": "error", "name": e, "inputs": []} for e in errors]
    return {"contractName": "SwarmCoordinator", "flavour": "p2pswarm", "compiler": f"vyper-{VYPER}",
            "source_sha256": source_digest(), "abi": abi, "bytecode": out["bytecode"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the artifact is of the current source")
    args = p.parse_args()
    if args.check:
        shipped = json.loads(ARTIFACT.read_text())
        if shipped.get("source_sha256") != source_digest():
            sys.exit(f"{ARTIFACT.name} is stale: run python -m p2pswarm.comm.chain.build")
        print(f"{ARTIFACT.name} is of the current {SOURCE.name}")
        return
    ARTIFACT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {ARTIFACT}")


if __name__ == "__main__":
    main()
