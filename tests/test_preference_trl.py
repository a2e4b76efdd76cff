"""The first preference step equals TRL 1.16's trainers (issue 17, Exactness).

Each TRL trainer (``DPOTrainer`` sigmoid/ipo/hinge, ``CPOTrainer`` simpo with ``cpo_alpha=0``,
``ORPOTrainer`` with its NLL restricted to the completion, ``RewardTrainer``) runs one step on
the CPU on a tiny Llama, all pairs in one padded batch; packtune trains the very token ids TRL
tokenized, packed as pairs into several varlen micro-batches. The loss, every gradient, the
gradient norm and the logged rewards agree.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

from packtune.data import load_tokenizer
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples
from packtune.preference.objective import Objective
from preference_reference import packed_step, pair_dataset

trl = pytest.importorskip("trl")

ROWS = [
    ("What is 2+3?", "5", "6, because two and three make six"),
    ("Name a colour of the sky.", "Blue", "Green"),
    ("Spell cat backwards.", "tac", "cat tac"),
    ("Is ice cold?", "Yes, ice is cold.", "No"),
    ("Capital of France?", "Paris", "Lyon is the capital"),
    ("Translate 'hello' to French.", "bonjour", "hola"),
]
MARGINS = [0.5, 0.0, 1.0, -0.25, 0.0, 2.0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("packtune://mistral-v1")


def tiny_config(tokenizer):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                pad_token_id=tokenizer.pad_token_id, num_labels=1)


def _twins(cls, tokenizer, seed: int):
    """The same weights as an sdpa model (TRL's) and a packtune_varlen model (packtune's)."""
    torch.manual_seed(seed)
    trl_model = cls.from_config(copy.deepcopy(tiny_config(tokenizer)), attn_implementation="sdpa")
    packed = cls.from_config(copy.deepcopy(tiny_config(tokenizer)), attn_implementation="packtune_varlen")
    packed.load_state_dict(trl_model.state_dict())
    return trl_model, packed


class _Grads(TrainerCallback):
    """The gradient of TRL's step, read before the optimizer uses it."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = torch.cat([p.grad.reshape(-1).clone() for p in self.model.parameters() if p.grad is not None])


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=len(ROWS), gradient_accumulation_steps=1,
               max_steps=1, learning_rate=1e-3, max_grad_norm=1e9, logging_steps=1, report_to="none", save_strategy="no",
               disable_tqdm=True, seed=0, bf16=False, **kw)


def _run(trainer):
    grads = _Grads(trainer.model)
    trainer.add_callback(grads)
    trainer.train()
    return trainer.state.log_history[0], grads.grads


def _samples(pairs: list[tuple[list[int], list[int], list[int], list[int]]]) -> TokenizedSamples:
    """``(chosen ids, chosen labels, rejected ids, rejected labels)`` per pair to packtune's samples."""
    seqs = []
    for c_ids, c_lab, r_ids, r_lab in pairs:
        seqs += [(list(c_ids), list(c_lab)), (list(r_ids), list(r_lab))]
    return TokenizedSamples.from_lists(seqs)


def _packtune(objective, policy, ref, samples, margins):
    """packtune's step: the pairs packed into rows of the longest pair, two packs per micro-batch."""
    lengths = np.diff(samples.offsets).reshape(-1, 2).sum(1)
    dataset = pair_dataset(samples, np.asarray(margins, np.float64), int(lengths.max()))
    assert len(dataset) > 2  # several micro-batches: the normalisation is global, not per micro-batch
    accumulation = -(-len(dataset) // 2)
    result, grads = packed_step(objective, policy, ref, dataset, 2, accumulation, 7)
    return result, grads


def _compare(log, trl_grads, result, grads, names):
    assert result.loss == pytest.approx(log["loss"], rel=1e-5, abs=1e-6)
    assert torch.allclose(grads, trl_grads, rtol=1e-5, atol=1e-5 * float(trl_grads.abs().max())), float((grads - trl_grads).abs().max())
    assert float(torch.linalg.vector_norm(grads)) == pytest.approx(log["grad_norm"], rel=1e-5)
    for name in names:
        assert result.metrics[name] == pytest.approx(log[name], rel=1e-5, abs=1e-6), name


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _text_rows():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ROWS])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl_dpo_trainer(tokenizer, tmp_path, loss):
    from trl import DPOConfig, DPOTrainer

    policy, packed = _twins(AutoModelForCausalLM, tokenizer, 0)
    ref, ref_packed = _twins(AutoModelForCausalLM, tokenizer, 1)
    beta = 0.3
    trainer = DPOTrainer(policy, ref_model=ref, args=_args(DPOConfig, tmp_path, beta=beta, loss_type=[loss]),
                         train_dataset=_text_rows(), processing_class=copy.deepcopy(tokenizer))
    data = trainer.train_dataset
    pairs = [(p + c, [IGNORE_INDEX] * len(p) + c, p + r, [IGNORE_INDEX] * len(p) + r)
             for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    log, trl_grads = _run(trainer)
    result, grads = _packtune(Objective("dpo", loss, beta=beta), packed, ref_packed.eval(), _samples(pairs),
                              np.zeros(len(pairs)))
    _compare(log, trl_grads, result, grads, DPO_METRICS)


def _labelled(data):
    """CPO/ORPO's tokenized rows: their own input ids and labels (the prompt masked)."""
    return [(ci, cl, ri, rl) for ci, cl, ri, rl in zip(data["chosen_input_ids"], data["chosen_labels"],
                                                       data["rejected_input_ids"], data["rejected_labels"])]


def test_simpo_equals_trl_cpo_trainer(tokenizer, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, packed = _twins(AutoModelForCausalLM, tokenizer, 0)
    beta, gamma = 2.0, 0.4
    args = _args(CPOConfig, tmp_path, beta=beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma)
    trainer = CPOTrainer(policy, args=args, train_dataset=_text_rows(), processing_class=copy.deepcopy(tokenizer))
    pairs = _labelled(trainer.train_dataset)
    log, trl_grads = _run(trainer)
    result, grads = _packtune(Objective("simpo", beta=beta, simpo_gamma=gamma), packed, None, _samples(pairs),
                              np.zeros(len(pairs)))
    _compare(log, trl_grads, result, grads, DPO_METRICS)


def _completion_nll_orpo():
    """TRL's ORPOTrainer with its NLL over the chosen completion's tokens only (the ORPO paper's
    definition, packtune's; TRL 1.16 also counts the prompt's tokens)."""
    from trl.experimental.orpo import ORPOTrainer

    class CompletionNLL(ORPOTrainer):
        nll_pairs: list[tuple[float, float]] = []

        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            chosen_logits = out[2]  # the chosen rows' logits without their last position
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                           device=self.accelerator.device)
            labels = cat["concatenated_labels"][: chosen_logits.shape[0], 1:]
            nll = F.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            self.nll_pairs.append((float(out[4]), float(nll)))  # TRL's (prompt counted), the completion's
            return (*out[:4], nll, *out[5:])

    return CompletionNLL


def test_orpo_equals_trl_orpo_trainer_with_completion_nll(tokenizer, tmp_path):
    from trl.experimental.orpo import ORPOConfig

    policy, packed = _twins(AutoModelForCausalLM, tokenizer, 0)
    beta = 0.5
    trainer = _completion_nll_orpo()(policy, args=_args(ORPOConfig, tmp_path, beta=beta), train_dataset=_text_rows(),
                                     processing_class=copy.deepcopy(tokenizer))
    pairs = _labelled(trainer.train_dataset)
    log, trl_grads = _run(trainer)
    result, grads = _packtune(Objective("orpo", beta=beta), packed, None, _samples(pairs), np.zeros(len(pairs)))
    _compare(log, trl_grads, result, grads, DPO_METRICS)
    # The restriction is the one deliberate difference, and it shows: TRL's own loss (the NLL
    # over the prompt's tokens too) is another number.
    (full, completion), = trainer.nll_pairs
    assert result.loss != pytest.approx(log["loss"] - completion + full, rel=1e-4)


@pytest.mark.parametrize("center", [None, 0.1])
def test_reward_equals_trl_reward_trainer(tokenizer, tmp_path, center):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    policy, packed = _twins(AutoModelForSequenceClassification, tokenizer, 0)
    # The completions end with their end-of-turn (</s>): TRL reads the reward at the last token
    # that is not a pad, so the pad must be another token for it to read the end-of-turn's score.
    rows, pairs = [], []
    for (p, c, r), m in zip(ROWS, MARGINS):
        prompt = tokenizer(p)["input_ids"]
        chosen, rejected = (tokenizer(p + " " + x)["input_ids"][len(prompt):] + [tokenizer.eos_token_id] for x in (c, r))
        rows.append({"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected, "margin": m})
        pairs.append((prompt + chosen, [IGNORE_INDEX] * len(prompt) + chosen,
                      prompt + rejected, [IGNORE_INDEX] * len(prompt) + rejected))
    args = _args(RewardConfig, tmp_path, pad_token="<unk>", center_rewards_coefficient=center)
    trainer = RewardTrainer(policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=copy.deepcopy(tokenizer))
    log, trl_grads = _run(trainer)
    packed.config.pad_token_id = policy.config.pad_token_id
    result, grads = _packtune(Objective("reward", center_rewards_coefficient=center), packed, None, _samples(pairs),
                              MARGINS)
    _compare(log, trl_grads, result, grads, ("accuracy", "margin"))
