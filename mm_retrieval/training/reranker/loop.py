"""The training loop: optimiser, hard-negative sampling, the listwise loss, keep-best model selection.

**Loss.** Per training row, ``negatives`` images drawn uniformly (without replacement) from the
caption's hard pool plus the positive are scored and a listwise cross-entropy puts the positive
first. Image memory is computed inside the forward, so gradients reach the image projection.
ALBEF draws negatives in proportion to the similarity softmax; with CLIP's logit scale that
distribution is so peaked it keeps drawing the same few images, and the top of the first stage is
already hard, so uniform over the pool is both simpler and more varied. What is scored depends on
the objective:

* ``separate`` (default): the head's logits alone (the first-stage score is zeroed), so it learns
  to rank on its own; with the head starting at zero the first loss is chance, ``ln(1 + negatives)``.
  At each validation the first stage's weight is set to the grid value that ranks val best
  (:meth:`TrainLoop._fit_scale`).
* ``residual``: exactly as at inference, ``retrieval_scale * cosine + head(text tokens x image
  memory)``; with the head at zero the first loss is the first stage's own softmax loss on these
  candidates, and the head learns corrections on top of it.

**Model selection.** Before training (epoch 0) the zero head ranks exactly like the first stage;
that is the baseline. After each epoch the val split is reranked (the first stage's top
``min(100, gallery)`` per caption); the best state by val R@1 (ties: MRR) is kept, and training
stops after ``patience`` epochs without improvement. If nothing beats epoch 0 the initial weights
are shipped: a reranker never loses to doing nothing on val.

**Learning rate.** A short linear warm-up, then constant: it does not depend on ``epochs``, so a
finished run can be extended by resuming with more epochs exactly as if it had run longer.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mm_retrieval.training.reranker.split import recall

if TYPE_CHECKING:
    import torch

    from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer, RerankerConfig
    from mm_retrieval.training.reranker.config import RerankerTrainConfig
    from mm_retrieval.training.reranker.data import Features
    from mm_retrieval.training.reranker.split import Split

logger = logging.getLogger(__name__)

EVAL_DEPTH = 100  # val: rerank the first stage's top 100, the usual inference depth
WARMUP_STEPS = 50  # linear warm-up, capped at one epoch; then the learning rate is constant
GRAD_CLIP = 1.0
EVAL_PAIRS = 4096  # (caption, image) pairs scored per forward at validation
TEXT_NEGATIVES = 7  # binding: captions scored against each positive image besides its own


def _twin_images(split: Split, feats: Features) -> list[list[int]]:
    """Per caption of ``split``: gallery indices of its twins' images (never a relevant one)."""
    import torch

    local = {int(c): i for i, c in enumerate(split.queries.tolist())}
    images: dict[int, list[int]] = {}
    for qi, img in zip(split.row_query.tolist(), split.row_image.tolist()):
        images.setdefault(qi, []).append(img)
    out = []
    for qi, gc in enumerate(split.queries.tolist()):
        rel = set(torch.nonzero(split.relevant[qi]).flatten().tolist())
        found = [im for t in feats.caption_twins[gc] if t in local for im in images.get(local[t], [])]
        out.append([im for im in dict.fromkeys(found) if im not in rel])
    return out


class TrainLoop:
    """Model, optimiser, sampling and model selection; state round-trips through plain tensors."""

    def __init__(self, model_cfg: RerankerConfig, feats: Features, train: Split, train_pool: torch.Tensor,
                 val: Split, n_neg: int, device: torch.device, recipe: RerankerTrainConfig):
        import torch

        from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer

        self.cfg, self.feats, self.train, self.train_pool, self.val = model_cfg, feats, train, train_pool, val
        self.n_neg, self.device = n_neg, device
        self.batch_size, self.lr, self.objective = recipe.batch_size, recipe.lr, recipe.objective
        self.model = CrossAttentionScorer(model_cfg).to(device)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=recipe.lr,
        )
        self.generator = torch.Generator().manual_seed(recipe.seed)  # shuffling + negative sampling
        self.steps_per_epoch = math.ceil(len(train.row_query) / recipe.batch_size)
        self.warmup = max(1, min(WARMUP_STEPS, self.steps_per_epoch))

        # Val: the first stage's ranking and top candidates never change; compute them once.
        self.val_order = torch.sort(val.sims, dim=1, descending=True, stable=True).indices
        self.depth = min(EVAL_DEPTH, len(val.images))
        self.first_stage_metrics = recall(self.val_order, val.relevant)

        # Binding negatives (:mod:`.binding`): twins always in a caption's image set, rewritten and
        # twin captions against each image on the text side.
        self.binding = bool(getattr(recipe, "binding", False)) and feats.caption_twins is not None
        self.val_twins = _twin_images(val, feats) if feats.caption_twins is not None else None
        if self.binding:
            self._setup_binding()

        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_epoch = 0
        self.best_key: tuple[float, float] = (-1.0, -1.0)
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] = {}
        self.bad_epochs = 0

    def _setup_binding(self) -> None:
        """Per training caption: its twins' images (padded with -1) and a hard pool without them,
        and the captions its image is scored against on the text side (twins' first)."""
        import torch

        train, feats = self.train, self.feats
        twins = _twin_images(train, feats)
        T = min(self.n_neg, max((len(t) for t in twins), default=0))
        self.twin_img = torch.full((len(twins), max(T, 1)), -1, dtype=torch.long)
        is_twin = torch.zeros_like(train.relevant)
        for qi, t in enumerate(twins):
            if t:
                is_twin[qi, t] = True
                self.twin_img[qi, : min(T, len(t))] = torch.tensor(t[:T])
        masked = train.sims.masked_fill(train.relevant | is_twin, float("-inf"))
        self.train_pool = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : self.train_pool.shape[1]]
        rows = []
        for gc in train.queries.tolist():
            ids = list(dict.fromkeys(feats.caption_twins[gc] + feats.caption_rewrites[gc]))
            rows.append([i for i in ids if i != gc][:TEXT_NEGATIVES])
        self.text_cands = torch.full((len(rows), TEXT_NEGATIVES), -1, dtype=torch.long)
        for qi, ids in enumerate(rows):
            if ids:
                self.text_cands[qi, : len(ids)] = torch.tensor(ids)

    # -- model selection ----------------------------------------------------------------------

    def evaluate_initial(self) -> None:
        """Epoch 0: the untrained model ranks like the first stage; it is the baseline to beat."""
        metrics = self.evaluate()
        self._record(None, metrics)

    def _record(self, loss: float | None, metrics: dict[str, float]) -> None:
        self.history.append({"epoch": self.epoch, "loss": loss, **metrics})
        key = (metrics["R@1"], metrics["MRR"])
        if key > self.best_key:  # strictly better: ties keep the earlier (simpler) model
            self.best_key, self.best_epoch, self.best_metrics = key, self.epoch, metrics
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def best_model(self) -> CrossAttentionScorer:
        from mm_retrieval.stages.rerankers.cross_attention.model import CrossAttentionScorer

        model = CrossAttentionScorer(self.cfg)
        model.load_state_dict(self.best_state)
        return model.eval()

    def evaluate(self, fit_scale: bool = True) -> dict[str, float]:
        """Rerank each val caption's first-stage top ``depth``; metrics over the whole gallery.

        With the ``separate`` objective and ``fit_scale``, the first-stage weight is first set to
        the value that ranks val best (see :meth:`_fit_scale`).
        """
        import torch

        model, val, feats, K = self.model, self.val, self.feats, self.depth
        model.eval()
        top = self.val_order[:, :K]  # [q, K] gallery indices
        first = val.sims.gather(1, top)  # [q, K] first-stage cosines
        with torch.no_grad():
            used = top.unique()  # only the candidates' images need a memory
            memory = self._memory(val.images[used])
            slot = torch.full((len(val.images),), -1, dtype=torch.long)
            slot[used] = torch.arange(memory.shape[0])
            per = max(1, EVAL_PAIRS // K)
            heads = []
            for s in range(0, len(val.queries), per):
                cand = top[s : s + per]  # [b, K]
                b = cand.shape[0]
                caps = val.queries[s : s + b].repeat_interleave(K)
                out = model(  # a zero first-stage score leaves the head's own logits
                    feats.text_tokens[caps].to(self.device), feats.text_mask[caps].to(self.device),
                    memory[slot[cand.reshape(-1)].to(self.device)],
                    torch.zeros(b * K), pairs=True, chunk_size=1024, roles=self._roles(caps),
                )
                heads.append(out.view(b, K).cpu())
            head = torch.cat(heads)
            if fit_scale and self.objective == "separate":
                self._fit_scale(first, head, top)
            scale = float(model.retrieval_scale.detach())
            metrics = self._rank(scale * first + head, top)
            if self.val_twins is not None:
                metrics["contrast"] = self._contrast(scale)
        return metrics

    def _memory(self, images: torch.Tensor) -> torch.Tensor:
        """Image memory of global image ids ``images`` (with their pixels for a local image side)."""
        feats, dev = self.feats, self.device
        pixels = None
        if self.model.needs_pixels:
            pixels = feats.pixels[images].to(dev).float()
        return self.model.image_memory(feats.image_tokens[images].to(dev).float(), pixels)

    def _roles(self, caps: torch.Tensor) -> torch.Tensor | None:
        """Token roles of captions ``caps`` for a phrase head (None without one)."""
        if self.model.phrases is None or self.feats.text_roles is None:
            return None
        return self.feats.text_roles[caps].to(self.device)

    def _contrast(self, scale: float) -> float:
        """Val binding in isolation: the share of captions with twins whose own image the model
        (``scale`` * first stage + head) puts above every twin's image (chance 1 / (1 + twins))."""
        import torch

        val, feats = self.val, self.feats
        qs = [qi for qi, t in enumerate(self.val_twins) if t]
        if not qs:
            return float("nan")
        own = val.relevant.to(torch.uint8).argmax(1)
        right = 0
        for s in range(0, len(qs), 256):
            chunk = qs[s : s + 256]
            cands = [[int(own[qi])] + self.val_twins[qi] for qi in chunk]
            width = max(map(len, cands))
            idx = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands])  # pad with the own image
            q = torch.tensor(chunk).repeat_interleave(width)
            caps = val.queries[q]
            mem = self._memory(val.images[idx.reshape(-1)])
            first = val.sims[q, idx.reshape(-1)]
            logits = self.model(feats.text_tokens[caps].to(self.device), feats.text_mask[caps].to(self.device),
                                mem, torch.zeros(len(q)), pairs=True, chunk_size=1024, roles=self._roles(caps)).cpu()
            logits = (logits + scale * first).view(len(chunk), width)
            right += int((logits.argmax(1) == 0).sum())  # ties and padding keep the own image first
        return right / len(qs)

    def _rank(self, logits: torch.Tensor, top: torch.Tensor) -> dict[str, float]:
        import torch

        rerank = torch.sort(logits, dim=1, descending=True, stable=True).indices
        ranking = torch.cat([top.gather(1, rerank), self.val_order[:, top.shape[1]:]], dim=1)
        return recall(ranking, self.val.relevant)

    def _fit_scale(self, first: torch.Tensor, head: torch.Tensor, top: torch.Tensor) -> None:
        """Set the first-stage weight to the grid value whose val ranking is best (R@1, then MRR).

        The head was trained to rank on its own; how much the first stage should still count is one
        number, chosen on held-out captions like any other hyper-parameter. The grid spans the
        encoder's own temperature / 64 to x 64, so the head alone and the first stage alone are
        both (nearly) within reach.
        """
        import torch

        base = self.cfg.retrieval_scale_init
        best_key, best_scale = None, base
        grid = [base * 2.0**k for k in torch.linspace(-6, 6, 37).tolist()]
        for scale in sorted(grid, key=lambda g: abs(math.log(g / base))):  # ties keep the nearest
            m = self._rank(scale * first + head, top)
            key = (m["R@1"], m["MRR"])
            if best_key is None or key > best_key:
                best_key, best_scale = key, scale
        self.model.log_retrieval_scale.data.fill_(math.log(best_scale))

    # -- training -----------------------------------------------------------------------------

    def run(self, epochs: int, patience: int, progress: bool, save_state: Callable[[], None]) -> None:
        """Train epochs ``self.epoch + 1 .. epochs``, evaluating and saving state after each."""
        from tqdm.auto import tqdm

        remaining = max(0, epochs - self.epoch)
        if self.bad_epochs >= patience and remaining:
            logger.info("train-reranker: already stopped early at epoch %d", self.epoch)
            return
        bar = tqdm(total=remaining * self.steps_per_epoch, desc="train-reranker", unit="step",
                   disable=not progress, file=sys.stderr)
        with bar:
            while self.epoch < epochs:
                self.epoch += 1
                loss = self._train_epoch(bar)
                metrics = self.evaluate()
                self._record(loss, metrics)
                self._postfix(bar, loss)
                logger.info(
                    "train-reranker: epoch %d loss %.4f val R@1 %.3f (first stage %.3f, best %.3f "
                    "at epoch %d)%s", self.epoch, loss, metrics["R@1"],
                    self.first_stage_metrics["R@1"], self.best_key[0], self.best_epoch,
                    f"; val contrast {metrics['contrast']:.3f} (epoch 0: {self.history[0]['contrast']:.3f})"
                    if "contrast" in metrics else "",
                )
                save_state()
                if self.bad_epochs >= patience:
                    logger.info("train-reranker: no val improvement for %d epochs; stopping", patience)
                    break

    def _postfix(self, bar, loss: float) -> None:
        last = self.history[-1]["R@1"] if self.history else float("nan")
        bar.set_postfix(loss=f"{loss:.3f}", val_r1=f"{last:.3f}", best=f"{self.best_key[0]:.3f}")

    def _train_epoch(self, bar) -> float:
        import torch

        self.model.train()
        order = torch.randperm(len(self.train.row_query), generator=self.generator)
        total, count = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup)
            loss = self._loss(rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.step += 1
            total += float(loss.detach()) * len(rows)
            count += len(rows)
            bar.update(1)
            self._postfix(bar, float(loss.detach()))
        return total / count

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Listwise cross-entropy: each row's positive against its sampled hard negatives."""
        import torch
        import torch.nn.functional as F

        train, feats, dev = self.train, self.feats, self.device
        q, pos = train.row_query[rows], train.row_image[rows]  # [B]
        pool = self.train_pool[q]  # [B, pool]
        pick = torch.rand(pool.shape, generator=self.generator).argsort(1)[:, : self.n_neg]
        negs = pool.gather(1, pick)  # [B, n_neg]
        if self.binding:  # twins always in the set (the pool then holds no twin: no duplicates)
            tw = self.twin_img[q][:, : self.n_neg]
            negs[:, : tw.shape[1]] = torch.where(tw >= 0, tw, negs[:, : tw.shape[1]])
        cands = torch.cat([pos[:, None], negs], 1)  # [B, 1 + n_neg], positive first
        B, C = cands.shape
        score = train.sims[q[:, None], cands].reshape(-1)  # the first stage's cosine of each pair
        if self.objective == "separate":  # the head learns to rank on its own (see the module doc)
            score = torch.zeros_like(score)
        # Memory inside the graph so gradients reach image_in. Computed per pair rather than per
        # distinct image: sharing it would make backward a scatter-add, which is not deterministic.
        memory = self._memory(train.images[cands].reshape(-1))
        caps = train.queries[q].repeat_interleave(C)
        logits = self.model(
            feats.text_tokens[caps].to(dev), feats.text_mask[caps].to(dev),
            memory, score, pairs=True, chunk_size=B * C, roles=self._roles(caps),
        ).view(B, C)
        loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=logits.device))
        if not self.binding:
            return loss
        # Text side: the positive image against its caption, its twins' captions and rewrites.
        tc = self.text_cands[q]  # [B, K] global caption ids, -1 = none
        has = (tc >= 0).any(1)
        if not bool(has.any()):
            return loss
        K = tc.shape[1] + 1
        tcaps = torch.cat([train.queries[q][:, None], tc.clamp(min=0)], 1)  # [B, K], own caption first
        P, M = memory.shape[1:]
        tmem = memory.view(B, C, P, M)[:, 0:1].expand(B, K, P, M).reshape(B * K, P, M)
        if self.objective == "separate":
            tscore = torch.zeros(B * K)
        else:
            img = train.images[pos]
            tscore = (feats.text_emb[tcaps] @ feats.image_emb[img][:, :, None]).reshape(-1)
        tlogits = self.model(
            feats.text_tokens[tcaps.reshape(-1)].to(dev), feats.text_mask[tcaps.reshape(-1)].to(dev),
            tmem, tscore, pairs=True, chunk_size=B * K, roles=self._roles(tcaps.reshape(-1)),
        ).view(B, K)
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), tc >= 0], 1).to(tlogits.device)
        tlogits = tlogits.masked_fill(~valid, float("-inf"))[has]
        tloss = F.cross_entropy(tlogits, torch.zeros(len(tlogits), dtype=torch.long, device=tlogits.device))
        return (loss + tloss) / 2

    # -- resumable state ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Model, optimiser, best state, history and RNG states as plain tensors and containers."""
        import torch

        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best": {"epoch": self.best_epoch, "key": list(self.best_key),
                     "metrics": self.best_metrics, "state": self.best_state},
            "bad_epochs": self.bad_epochs,
            "rng": {"torch": torch.get_rng_state(), "sampler": self.generator.get_state()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output (read back from ``_train_state.pt``)."""
        import torch

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        best = state["best"]
        self.best_epoch, self.best_key = int(best["epoch"]), tuple(best["key"])
        self.best_metrics, self.best_state = dict(best["metrics"]), dict(best["state"])
        self.bad_epochs = int(state["bad_epochs"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["sampler"])
