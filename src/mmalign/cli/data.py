"""``mmalign data validate`` and ``mmalign data convert``: thin layers over ``mmalign.data``.

Both exit 0 when every record is valid and 1 when one is not (the first error is printed, or, with
``--skip-invalid-to``, the bad records go to that file and the valid ones are kept / written).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import RecordError, check_records
from mmalign.data.sources import CONVERTERS, convert_file
from mmalign.progress import track


def _count_lines(path: str | None) -> int:
    return 0 if path is None else sum(1 for line in Path(path).read_text().splitlines() if line.strip())


def _validate(args: argparse.Namespace) -> int:
    try:
        records = read_records(args.file, data_root=args.data_root, min_rejected=args.min_rejected,
                               skip_invalid_to=args.skip_invalid_to)
    except RecordError as err:
        print(f"mmalign data validate: invalid record: {err}", file=sys.stderr)
        return 1
    skipped = _count_lines(args.skip_invalid_to)
    n_rejected = sorted(len(r.rejected) for r in records)
    spread = f", {n_rejected[0]}-{n_rejected[-1]} rejected each" if records else ""
    print(f"{args.file}: {len(records)} valid record(s){spread}; {skipped} invalid")
    return 1 if skipped else 0


def _convert(args: argparse.Namespace) -> int:
    data_root = Path(args.data_root) if args.data_root is not None else Path(args.input).parent
    try:
        converted = track(convert_file(args.input, args.format), "convert (checking records)", unit="rec")
        records = check_records(converted, data_root=data_root, name=f"{args.input} ({args.format})",
                                min_rejected=args.min_rejected, skip_invalid_to=args.skip_invalid_to)
    except RecordError as err:
        print(f"mmalign data convert: invalid source row or record: {err}", file=sys.stderr)
        return 1
    provenance = {"source": args.format, "converted_from": str(Path(args.input).resolve()),
                  "data_root": str(data_root.resolve()),
                  "input_sha256": hashlib.sha256(Path(args.input).read_bytes()).hexdigest()}
    write_records(args.output, records, provenance=provenance)
    skipped = _count_lines(args.skip_invalid_to)
    print(f"{args.output}: {len(records)} record(s) written; {skipped} invalid")
    return 1 if skipped else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="validate record files; convert published datasets to records")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    validate = sub.add_parser("validate", help="check every record of a .jsonl/.parquet file")
    validate.add_argument("file", help="record file (.jsonl or .parquet)")
    validate.add_argument("--data-root", help="folder image paths are relative to (default: the file's folder)")
    validate.add_argument("--skip-invalid-to", help="write invalid records (file, line, id, field, reason) here")
    validate.add_argument("--min-rejected", type=int, default=0, help="fewest rejected answers per record")
    validate.set_defaults(func=_validate)

    convert = sub.add_parser("convert", help="convert a published layout to records")
    convert.add_argument("--format", required=True, choices=sorted(CONVERTERS), help="source layout")
    convert.add_argument("input", help="source file (.json, .jsonl or .parquet)")
    convert.add_argument("output", help="record file to write (.jsonl or .parquet)")
    convert.add_argument("--data-root", help="the source's image folder (default: the input file's folder)")
    convert.add_argument("--skip-invalid-to", help="write invalid records here and keep the rest")
    convert.add_argument("--min-rejected", type=int, default=0, help="fewest rejected answers per record")
    convert.set_defaults(func=_convert)
