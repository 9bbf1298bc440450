"""Generates the Python code of protos/ (the one command; generated files are never edited).

    python -m deploy.protogen            # regenerate in place
    python -m deploy.protogen --check    # exit 1 if the generated code is out of date

The generated modules live beside their .proto files under protos/meshserve/, which is
installed as the `meshserve` package (so `from meshserve.v1 import generation_pb2`).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc (grpcio-tools) on every .proto under root; returns the files written."""
    from grpc_tools import protoc  # a test/dev dependency, not needed at run time
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(root)) for p in proto_files(root)]
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    return sorted(p for p in out_dir.rglob("*.py*") if p.suffix in (".py", ".pyi"))


def stale_files(root: Path = PROTO_ROOT) -> list[str]:
    """Generated files that differ from what protoc makes now (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp) for p in generate(Path(tmp), root)}
        have = {p.relative_to(root) for p in root.rglob("*_pb2*.py*")}
        diff = sorted(str(p) for p in fresh ^ have)
        diff += sorted(str(p) for p in fresh & have
                       if not filecmp.cmp(Path(tmp) / p, root / p, shallow=False))
        return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"out of date: protos/{name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(PROTO_ROOT):
        print(f"wrote protos/{path.relative_to(PROTO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
