"""The reranker training recipe's settings: one set of defaults for ``train_reranker`` and the CLI.

Kept free of torch so ``mmr train-reranker --help`` can show the defaults without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm_retrieval.errors import ConfigError

OBJECTIVES = ("separate", "residual")

# The phrase head's width (``RerankerConfig.phrase_dim``) a new reranker gets where the encoder's
# patch tokens form a square grid: the relation term needs where each phrase was found
# (benchmarks/RESULTS.md, issue #25). ``reranker_config={"phrase_dim": 0}`` trains without it.
PHRASE_DIM = 64


@dataclass(frozen=True)
class RerankerTrainConfig:
    """Hyper-parameters of :func:`~mm_retrieval.training.train_reranker`; invalid values raise ConfigError.

    ``mmr train-reranker`` takes its option defaults from ``RerankerTrainConfig()``, so the library
    and the command line train the same way unless told otherwise.
    """

    # An upper bound: keep-best with ``patience`` usually stops earlier, and the learning rate does
    # not depend on it (warm-up then constant), so a longer budget costs only the extra epochs run.
    epochs: int = 20
    # Captions per step; each brings 1 + ``negatives`` candidates, so 32 x 16 = 512 scored pairs.
    batch_size: int = 32
    # AdamW, after a 50-step warm-up. The rate of the recipe the demo and ``mmr bench --suite
    # quality`` train and measure with (``demo.RERANKER_RECIPE``, benchmarks/RESULTS.md).
    lr: float = 1e-3
    # On matrices only: it pulls the head toward zero, i.e. toward the first stage's ranking.
    weight_decay: float = 0.01
    # Hard negatives per caption per step: a 16-way listwise loss per caption.
    negatives: int = 15
    # Negatives are drawn uniformly from this many best-ranked non-relevant images: deep enough to
    # vary from step to step, shallow enough that every negative is one the first stage confuses.
    hard_pool: int = 32
    # Held-out share of split units; it picks the epoch and guards against shipping a reranker
    # worse than the first stage.
    val_fraction: float = 0.1
    # Val R@1 over a few hundred captions moves in coarse, noisy steps, so one flat epoch says
    # little; stopping late costs only time, since keep-best ships the best epoch anyway.
    patience: int = 6
    # Seeds the split, the initial weights and the sampling; CPU runs are deterministic.
    seed: int = 0
    # Rows sharing a value of any of these columns stay on one side of the split: the four images
    # of a contrast group share their caption words, so splitting inside a group would leak.
    # ``group`` is skipped when the table has no such column.
    split_by: tuple[str, ...] = ("group",)
    # ``separate``: the head learns to rank on its own and the first stage's weight is fitted on val;
    # a residual head gets almost no signal where the first stage has memorised its training
    # captions. ``residual``: the head learns corrections on top of the first stage's scores.
    objective: str = "separate"
    # Negatives that need binding (.negatives): each caption's twins (same words, other binding:
    # word permutations, contrast-group mates) always among its images, and on the text side its
    # image against its twins' captions and captions rewritten by swapping attributes/objects.
    # With the phrase head it is what lifts held-out relation flips from chance (benchmarks/
    # RESULTS.md, issue #25); captions with neither train as without it.
    binding: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_by", tuple(self.split_by))
        for name in ("epochs", "batch_size", "negatives", "hard_pool", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr >= 0 or not self.weight_decay >= 0:  # `not >=` also rejects NaN
            raise ConfigError(f"lr and weight_decay must be >= 0, got {self.lr!r} and {self.weight_decay!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"val_fraction must be in (0, 1), got {self.val_fraction!r}: the validation split picks "
                "the best epoch and guards against shipping a reranker worse than the first stage"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


DEFAULTS = RerankerTrainConfig()
