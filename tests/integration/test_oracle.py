"""The activation oracle (#36): its write is canvas-scope's, its training lowers its loss, bad latents are refused."""

from __future__ import annotations

import pytest
import torch

from diffusionlens import RowReplayNoise
from diffusionlens.lens import harvest_residuals, resid_hook
from diffusionlens.lens.oracle import QUESTIONS, ActivationOracle, oracle_examples
from diffusionlens.lens.reading import reading_rows
from diffusionlens.lens.scope import canvas_scope_tokens
from diffusionlens.toy import make_dataset


@pytest.fixture(scope="module")
def examples(toy):
    data = harvest_residuals(toy, make_dataset(None, 16, 21, split="train", unique=True).prompts, progress=False)
    return oracle_examples(toy, data, reading_rows(data, [toy.cfg.eos_token_id]), layers=[2, 3])


def test_oracle_writes_where_canvas_scope_writes(toy, examples):
    oracle, layer = ActivationOracle(toy), 2
    # the question run's own residual written back leaves its first pass unchanged: the write is that hook
    ids = toy.to_tokens(QUESTIONS["token"])
    settings = dict(noise=RowReplayNoise([0]), progress=False, max_new_tokens=toy.cfg.canvas_length)
    _, cache = toy.generate_with_cache(ids, names_filter=resid_hook(layer), max_denoising_steps=1, **settings)
    own = cache.get(resid_hook(layer), step=0)[:, 0]
    canvas = RowReplayNoise([0]).initial_canvas(1, toy.cfg.canvas_length, toy.cfg.vocab_size, "cpu", 0)
    with torch.no_grad():
        plain = toy(ids, canvas)
        assert torch.equal(oracle.logits(own, layer, "token", canvas), plain)
        other = oracle.logits(examples.latent[:1], layer, "token", canvas)
    assert not torch.equal(other[:, 0], plain[:, 0])
    # reading is canvas-scope on the oracle's model: residual route, the question as target, one step
    latents = examples.latent[:5]
    expected = canvas_scope_tokens(oracle.model, latents, layer=layer, position=0, target="oracle:", write_steps=1)
    assert torch.equal(oracle.answer_tokens(latents, layer=layer), expected[:, 0])


def test_training_lowers_the_oracle_loss(toy, examples):
    oracle = ActivationOracle(toy, first_trained_layer=3)
    before = [p.clone() for p in toy.parameters()]

    def held_loss() -> float:
        with torch.no_grad():
            rows = torch.arange(min(64, len(examples)))
            question, layer = examples.question[0], int(examples.layer[0])
            same = [i for i in rows.tolist() if examples.question[i] == question and examples.layer[i] == layer]
            generator = torch.Generator().manual_seed(99)
            return float(oracle.loss(examples.subset(torch.tensor(same)), generator))

    start = held_loss()
    with pytest.raises(ValueError, match="one question at one layer"):
        oracle.loss(examples, torch.Generator())  # every layer and question at once
    losses = oracle.train(examples, steps=40, batch_size=32, lr=1e-3)
    assert len(losses) == 40 and held_loss() < start
    # the copy was trained, never the model it was copied from
    assert all(torch.equal(p, q) for p, q in zip(before, toy.parameters(), strict=True))
    frozen = oracle.model.decoder.blocks[0].parameters()
    assert all(torch.equal(p, q) for p, q in zip(frozen, toy.decoder.blocks[0].parameters(), strict=True))


def test_oracle_refuses_bad_input(toy, examples):
    oracle = ActivationOracle(toy)
    d_model = toy.cfg.hidden_size
    with pytest.raises(ValueError, match=rf"expects \[{d_model}\] or \[batch, {d_model}\]"):
        oracle.answer_tokens(torch.zeros(3, d_model + 1), layer=2)
    with pytest.raises(ValueError, match="layer= in 0"):
        oracle.answer_tokens(torch.zeros(d_model), layer=toy.cfg.num_hidden_layers)
    with pytest.raises(ValueError, match="unknown question"):
        oracle.answer_tokens(torch.zeros(d_model), layer=1, question="colour")
    with pytest.raises(ValueError, match="first_trained_layer"):
        ActivationOracle(toy, first_trained_layer=-1)


def test_the_reading_experiments_share_one_command_line():
    from diffusionlens.lens.train_tuned import experiment_parser, parse_experiment_args

    parser = experiment_parser("python -m diffusionlens.lens.oracle", "An oracle.\n\nMore.")
    parser.add_argument("--steps", type=int, default=300)
    args = parse_experiment_args(parser, ["--seed", "3", "--threads", "0", "--steps", "5"])
    shared = (args.model, args.train_prompts, args.test_prompts, args.max_rows_per_step, args.seed, args.threads)
    assert shared == ("toy", 600, 128, 200, 3, 0) and args.steps == 5
    assert args.command_line == "python -m diffusionlens.lens.oracle --seed 3 --threads 0 --steps 5"
    assert parser.description == "An oracle."
