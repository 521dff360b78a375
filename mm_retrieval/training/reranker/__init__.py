"""Train the cross-attention reranker (:mod:`mm_retrieval.stages.rerankers.cross_attention.model`)
on an image-caption table.

The recipe is ALBEF/BLIP's image-text matching with hard negatives from a frozen first stage:

1. **Features, once** (:mod:`.data`). The dual encoder is frozen; every unique image and caption is
   encoded once and kept in memory as CPU tensors.
2. **Split** (:mod:`.split`). Rows are split into train/val by unit: rows sharing an image or a
   value of any ``split_by`` column (default the contrast ``group``, when the table has it: the
   four images of a group share their caption words, so splitting inside a group would leak) form
   one unit. Seeded. Val captions search the whole table's images, as in a collection.
3. **Candidates** (:mod:`.split`). The first stage is the cosine similarity over the gallery; each
   training caption's hard pool is its ``hard_pool`` best-ranked non-relevant images.
4. **Loss** (:mod:`.loop`). Per caption, the positive and ``negatives`` images drawn uniformly from
   its hard pool; a listwise cross-entropy puts the positive first. With the default objective,
   ``separate``, the head scores the candidates on its own (the first-stage score is left out) and
   the weight the first stage keeps at inference, ``retrieval_scale`` in ``retrieval_scale *
   cosine + head``, is fitted on val after each epoch. With ``residual`` the candidates are scored
   exactly as at inference and the head learns corrections on top of the first stage. With
   ``binding`` (:mod:`.negatives`, :mod:`.binding`), each caption's twins are always among its
   images, and a text-side term ranks its image's own caption above twin and rewritten captions;
   the loss is the mean of the two terms. The default: together with the model's phrase head
   (``RerankerConfig.phrase_dim``, on by default through :func:`.data.model_config`) it is what
   lifts held-out relation flips from chance (benchmarks/RESULTS.md, issue #25).
5. **Model selection** (:mod:`.loop`). Epoch 0 (the zero head, which ranks exactly like the first
   stage) is the baseline; after each epoch val is reranked and the best state by val R@1 (ties:
   MRR) is kept; training stops after ``patience`` epochs without improvement. If nothing beats
   epoch 0 the first-stage-equivalent weights are shipped.
6. **Resumable** (:mod:`.state`). After every epoch ``OUT/_train_state.pt`` holds everything needed
   to continue; ``resume=True`` does. The learning rate does not depend on ``epochs``, so a
   finished run can be extended (``keep_state=True``, then ``resume=True`` with more epochs) exactly
   as if it had run longer in one go.

Settings and their defaults, shared with ``mmr train-reranker``: :mod:`.config`. The entry point,
:func:`train_reranker` (:mod:`.train`), writes a reranker checkpoint tied to the encoder's
fingerprint. Torch is imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from mm_retrieval.training.reranker.config import OBJECTIVES, RerankerTrainConfig
from mm_retrieval.training.reranker.state import STATE_FILE
from mm_retrieval.training.reranker.train import RerankerTrainResult, train_reranker

__all__ = ["OBJECTIVES", "STATE_FILE", "RerankerTrainConfig", "RerankerTrainResult", "train_reranker"]
