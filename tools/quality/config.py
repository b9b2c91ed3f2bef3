"""The two configurations of the quality benchmark: `full` (trained on a GPU in a few minutes)
and `smoke` (the CPU test: a smaller model, easier problems, seconds of training).

Everything that changes what is trained is in `Config`, and its hash names the checkpoint cache
(bench-out/quality/<name>-<hash>/), so a rerun with the same configuration skips training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .tasks import Difficulty


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    intermediate: int = 768
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 512
    max_positions: int = 256


@dataclass(frozen=True)
class Training:
    corpus_docs: int = 400_000
    block: int = 128  # pretraining sequence length (documents packed)
    pretrain_steps: int = 3000
    pretrain_batch: int = 256
    pretrain_lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.1
    ft_examples: int = 50_000  # fine-tuning pool per task (facts: the questions about half the people)
    ft_steps: int = 1000
    ft_batch: int = 128
    ft_lr: float = 5e-4
    ft_warmup: int = 50
    seed: int = 0
    # share of the pretraining documents that are solved examples of the tasks' easier versions
    # (tasks.easier): 0 = the base has never seen a task format
    task_share: float = 0.0
    # candidate fine-tuning learning rates (empty: ft_lr). Every expert is fine-tuned at each;
    # the smallest whose experts' mean own-task accuracy is within 10 % of the best is kept
    # (the mildest fine-tune that still makes the experts), decided on expert quality alone.
    ft_lrs: tuple = ()


@dataclass(frozen=True)
class Config:
    name: str = "full"
    shape: Shape = field(default_factory=Shape)
    training: Training = field(default_factory=Training)
    difficulty: Difficulty = field(default_factory=Difficulty)
    n_test: int = 200  # held-out examples per task
    n_ood: int = 100  # out-of-distribution prompts per kind
    n_router: int = 300  # labelled router-fitting prompts per task (from the fine-tuning pools)

    def as_dict(self) -> dict:
        return asdict(self)

    def training_hash(self) -> str:
        """Hash of what determines the checkpoints (not the evaluation sizes)."""
        d = {k: v for k, v in self.as_dict().items() if k in ("shape", "training", "difficulty", "n_test")}
        d["version"] = TRAIN_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


TRAIN_VERSION = 2  # bump when the training code changes what it produces

# Scenario "specialise" (the default): the base saw easier versions of every task in
# pretraining; the experts specialise it with the mildest fine-tune that works.
FULL = Config(training=Training(pretrain_steps=2000, task_share=0.1, ft_lrs=(1e-4, 3e-4)))

# Scenario "scratch": the base never saw a task format; each expert learns its task from
# scratch at lr 5e-4 (task vectors ~15-20 % of the weights, lm_head ~50 %).
SCRATCH = Config(name="scratch")

SMOKE = Config(
    name="smoke",
    shape=Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256, max_positions=128),
    training=Training(corpus_docs=4000, block=64, pretrain_steps=150, pretrain_batch=32, pretrain_lr=3e-3, warmup=20,
                      ft_examples=3000, ft_steps=120, ft_batch=32, ft_lr=2e-3, ft_warmup=10),
    difficulty=Difficulty(max_operand=9, max_mul=9, list_min=2, list_max=3, people=16, sentence_max_adj=0),
    n_test=24,
    n_ood=8,
    n_router=40,
)

CONFIGS = {"full": FULL, "scratch": SCRATCH, "smoke": SMOKE}
