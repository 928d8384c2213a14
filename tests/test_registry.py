"""A fourth drafter is one class and one registry line: defined here, registered here, and
decoded losslessly through the factory and the CLI with no other module touched."""
import contextlib
import io
import json

import pytest

from helpers import plain_greedy, random_prompts
from hybrid_sd import decode, factory
from hybrid_sd.config import EngineConfig
from hybrid_sd.drafters import DRAFTERS, Draft, Drafter, DrafterKind, register
from hybrid_sd.drafters.registry import unregister


class EchoDrafter(Drafter):
    """Proposes the bonus token again, k times: often wrong, so both accept and reject run."""

    name = "echo"
    default_k = 3

    @classmethod
    def load(cls, target, checkpoint, options):
        return cls()

    def reset(self, max_len: int) -> None:
        self.frontier = 0

    def draft(self, ctx, k, sampling, generator=None):
        return Draft(ctx.tokens[ctx.n:ctx.n + 1].repeat(k))


@pytest.fixture
def echo():
    register(DrafterKind(EchoDrafter, "repeats the last token", needs_checkpoint=False))
    yield DRAFTERS["echo"]
    unregister("echo")


def test_registered_drafter_decodes_losslessly_through_the_factory(target, echo):
    engine = factory.build_engine(target, (), "echo", EngineConfig())
    assert [type(d) for d in engine.drafters] == [EchoDrafter] and engine.k_max == 3
    for prompt in random_prompts(12, seed=21):
        gen = engine.generate(prompt, 24)
        assert gen.token_ids == plain_greedy(target, (), prompt, 24)
        assert "echo" in {r.drafter for r in gen.rounds}  # (a round with no token left to draft is plain)


def cli_json(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert decode.main(["--json", "--max-new-tokens", "16", *args]) == 0
    return json.loads(out.getvalue())


def test_registered_drafter_is_a_cli_choice_and_lossless(echo):
    assert "echo" in decode.build_parser().format_help()
    prompt = "Write the word 'la' ten times."
    got, plain = cli_json("--drafter", "echo", prompt), cli_json("--drafter", "none", prompt)
    assert got["token_ids"] == plain["token_ids"] and got["drafter"] == "echo" and got["k"] == 3


def test_unregistered_name_is_a_user_error(echo):
    unregister("echo")
    with pytest.raises(Exception, match="unknown drafter 'echo'"):
        factory.build_engine(None, (), "echo")
