"""``mmalign train dpo --config configs/lab_dpo.yaml key.sub=value ...``: offline preference optimisation.

The config is ``mmalign.trainers.offline.OfflineConfig`` (sections model, lora, data, loss, povid, optim, run);
``loss.name`` picks dpo / ipo / slic; ``forward`` the batch layout (auto, the default: prefix_cache where exact
for the model, else shared_prefix; both encode image and prompt once per pair; plain repeats them);
``povid.enabled=true`` adds POVID's noised-image answer as one more rejected answer (weight ``povid.weight`` in
the Eq. 5 mean, ``povid.noise_steps`` of 1000). Run under ``accelerate launch --config_file configs/accelerate/...``
for several processes. Bad records raise an error naming file, record id and field, or are skipped and
listed with ``data.skip_invalid_to=FILE``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmalign.cli.main import add_config_args
from mmalign.cli.online import register_online

logger = logging.getLogger(__name__)


def _train_dpo(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.data.collate import SequenceTooLong
    from mmalign.data.schema import RecordError
    from mmalign.trainers.offline import OfflineConfig, train_offline

    cfg = load_config(OfflineConfig, args.config, [*args.overrides, *(["run.resume=true"] if args.resume else [])])
    try:
        out = train_offline(cfg)
    except (RecordError, SequenceTooLong) as err:
        print(f"mmalign train dpo: bad input: {err}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a policy (dpo; online-dpo, mixed-dpo, online-bdhs)")
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="RECIPE")
    dpo = sub.add_parser("dpo", help="offline DPO / IPO / SLiC with MM-DPO beta and K rejected per chosen",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(dpo)
    dpo.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir")
    dpo.set_defaults(func=_train_dpo)
    register_online(sub)
