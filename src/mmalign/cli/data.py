"""``mmalign data validate`` and ``mmalign data convert``: thin layers over ``mmalign.data``.

Both exit 0 when every record is valid and 2 when one is not, like every command given bad input (the first
error is printed, or, with ``--skip-invalid-to``, the bad records go to that file and the valid ones are kept /
written). A listing or output file that is the input file itself is refused before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmalign.data.io import same_file, write_jsonl
from mmalign.data.record_files import image_root, read_records, write_records
from mmalign.data.record_set import file_sha256
from mmalign.data.schema import RecordError
from mmalign.data.source_files import convert_inputs
from mmalign.data.sources import CONVERTERS
from mmalign.progress import track

BAD_INPUT = 2  # the exit code of every mmalign command given bad input (mmalign.cli.main)


def _count_lines(path: str | None) -> int:
    return 0 if path is None else sum(1 for line in Path(path).read_text().splitlines() if line.strip())


def _validate(args: argparse.Namespace) -> int:
    try:
        records = read_records(args.file, data_root=args.data_root, min_rejected=args.min_rejected,
                               skip_invalid_to=args.skip_invalid_to)
    except RecordError as err:
        print(f"mmalign data validate: invalid record: {err}", file=sys.stderr)
        return BAD_INPUT
    skipped = _count_lines(args.skip_invalid_to)
    n_rejected = sorted(len(r.rejected) for r in records)
    spread = f", {n_rejected[0]}-{n_rejected[-1]} rejected each" if records else ""
    print(f"{args.file}: {len(records)} valid record(s){spread}; {skipped} invalid")
    return BAD_INPUT if skipped else 0


def _refuse_overwriting_input(inputs: list[str], output: str, skip_invalid_to: str | None) -> None:
    for flag, target in (("the output", output), ("--skip-invalid-to", skip_invalid_to)):
        for source in inputs:
            if target is not None and same_file(target, source):
                raise RecordError(f"{flag} {target!r} is the input file itself; refusing to overwrite the data",
                                  file=source)
    if skip_invalid_to is not None and same_file(skip_invalid_to, output):
        raise RecordError(f"--skip-invalid-to and the output are one file ({output!r})", file=inputs[0])


def _convert(args: argparse.Namespace) -> int:
    *inputs, output = args.paths
    if not inputs:
        print("mmalign data convert: give at least one input and the output file", file=sys.stderr)
        return 2
    data_root = image_root(inputs[0], args.data_root)
    errors: list[RecordError] = []
    provenance = {"source": args.format, "converted_from": [str(Path(p).resolve()) for p in inputs],
                  "data_root": str(data_root.resolve()),
                  "input_sha256": [file_sha256(p) if Path(p).is_file() else None for p in inputs]}
    try:
        _refuse_overwriting_input(inputs, output, args.skip_invalid_to)
        records = track(convert_inputs(inputs, args.format, data_root=data_root, min_rejected=args.min_rejected,
                                       on_invalid=errors.append if args.skip_invalid_to else None),
                        "convert", unit="rec")
        written = write_records(output, records, provenance=provenance)
    except RecordError as err:
        print(f"mmalign data convert: invalid source row or record: {err}", file=sys.stderr)
        return BAD_INPUT
    if args.skip_invalid_to:
        write_jsonl(args.skip_invalid_to, [e.as_dict() for e in errors])
    print(f"{output}: {written} record(s) written; {len(errors)} invalid")
    return BAD_INPUT if errors else 0


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
    convert.add_argument("paths", nargs="+", metavar="INPUT... OUTPUT",
                         help="source files (.json, .jsonl, .parquet) or datasets save_to_disk folders, e.g. every "
                              "shard of a set, then the record file to write (.jsonl or .parquet)")
    convert.add_argument("--data-root", help="the source's image folder (default: the first input's folder)")
    convert.add_argument("--skip-invalid-to", help="write invalid records here and keep the rest")
    convert.add_argument("--min-rejected", type=int, default=0, help="fewest rejected answers per record")
    convert.set_defaults(func=_convert)
