"""Training entry points: the dual encoder (``mmr train-encoder``) and the reranker
(``mmr train-reranker``)."""

from mm_retrieval.training.encoder import EncoderTrainResult, train_encoder
from mm_retrieval.training.reranker import RerankerTrainConfig, RerankerTrainResult, train_reranker

__all__ = ["EncoderTrainResult", "RerankerTrainConfig", "RerankerTrainResult", "train_encoder", "train_reranker"]
