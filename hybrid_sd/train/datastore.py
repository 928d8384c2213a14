"""Build the lookup drafter's datastore from the target's own answers:
`python -m hybrid_sd.train.datastore [--data DIR] [--out DIR]`.

It takes the training split's answers (`response_ids` of every row; the held-out split never
enters), in shard order, and writes `datastore.safetensors` and `datastore.json`
(`hybrid_sd/drafters/datastore.py`) atomically. No model runs: it takes seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from ..cli import Parser, out_dir
from ..errors import UserError, exit_code


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.datastore", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory of python -m hybrid_sd.train.data (default: the user cache)")
    p.add_argument("--out", default=None, type=out_dir, help="directory to write (default: DATA/datastore)")
    p.add_argument("--target", default=None, help="the target the answers came from, for its vocabulary size "
                                                  "(default: the embedded SmolLM2-135M-Instruct)")
    return exit_code(run, p.parse_args(argv))


def target_vocab_size(path: str | None) -> int:
    from transformers import AutoConfig

    from ..models.embedded import default_target_dir
    try:
        return int(AutoConfig.from_pretrained(path or default_target_dir()).vocab_size)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the target's config ({e})") from None


def run(args) -> Path:
    from ..drafters.datastore import Datastore
    from .data import default_data_dir, read_jsonl, split_shards

    data_dir = Path(args.data) if args.data else default_data_dir()
    out = Path(args.out) if args.out else data_dir / "datastore"
    vocab = target_vocab_size(args.target)
    answers = []
    for shard in tqdm(split_shards(data_dir, "train"), desc="datastore", unit="shard"):
        answers += [row["response_ids"] for row in read_jsonl(shard) if row.get("response_ids")]
    if not answers:
        raise UserError(f"the training split in {data_dir} holds no answers")
    try:
        store = Datastore.from_answers(answers, vocab)
    except ValueError as e:
        raise UserError(f"{data_dir}: {e} (were these answers written by this target?)") from None
    out.mkdir(parents=True, exist_ok=True)
    store.save(out)
    print(f"datastore: {store.answers} answers, {store.size} tokens -> {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
