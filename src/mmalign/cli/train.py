"""``mmalign train dpo --config configs/lab_dpo.yaml key.sub=value ...``: offline preference optimisation;
``mmalign train sft model=DIR data=records.jsonl``: supervised fine-tuning (``mmalign.trainers.sft.SFTConfig``).
``mmalign train rm --config configs/rm_apple.yaml model.path=... data.train=pairs.jsonl``: a reward model
(``mmalign.trainers.reward_model.RewardModelConfig``; ``critique.enabled=true`` for MM-RLHF's critique-based one).

The DPO config is ``mmalign.trainers.offline.OfflineConfig`` (sections model, lora, data, loss, povid, optim, run);
``loss.name`` picks dpo / ipo / slic (none: the SFT term alone, a control); ``forward`` the batch layout (auto,
the default: prefix_cache where exact for the model, else shared_prefix; both encode image and prompt once per
pair; plain repeats them);
``povid.enabled=true`` adds POVID's noised-image answer as one more rejected answer (weight ``povid.weight`` in
the Eq. 5 mean, ``povid.noise_steps`` of 1000). Run under ``accelerate launch --config_file configs/accelerate/...``
for several processes. Bad records raise an error naming file, record id and field, or are skipped and
listed with ``data.skip_invalid_to=FILE``. ``--resume`` continues from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmalign.cli.main import add_config_args, config_class
from mmalign.cli.online import register_online
from mmalign.cli.rl import register_rl

logger = logging.getLogger(__name__)


# recipe -> (config dataclass, train function, help); each trains with ``train_fn(load_config(cls, ...))``.
RECIPES = {
    "dpo": ("mmalign.trainers.offline:OfflineConfig", "mmalign.trainers.offline:train_offline",
            "offline DPO / IPO / SLiC with MM-DPO beta and K rejected per chosen"),
    "sft": ("mmalign.trainers.sft:SFTConfig", "mmalign.trainers.sft:train_sft",
            "supervised fine-tuning on your records (chosen = the target answer)"),
    "rm": ("mmalign.trainers.reward_model:RewardModelConfig", "mmalign.trainers.reward_model:train_reward_model",
           "a reward model: Bradley-Terry, or MM-RLHF's critique-based one (critique.enabled=true)"),
}


def _train(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.data.collate import SequenceTooLong

    config, train_fn = (config_class(spec) for spec in RECIPES[args.recipe][:2])
    cfg = load_config(config, args.config, args.overrides)
    try:
        out = train_fn(cfg)
    except SequenceTooLong as err:
        print(f"mmalign train {args.recipe}: bad input: {err}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help=f"train a policy ({', '.join(RECIPES)}; online-dpo, mixed-dpo, "
                                                 "online-bdhs; rloo, grpo, ppo)")
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="RECIPE")
    for name, (config, _, text) in RECIPES.items():
        recipe = sub.add_parser(name, help=text, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(recipe, config)
        recipe.set_defaults(func=_train, recipe=name)
    register_online(sub)
    register_rl(sub)
