"""Training entry points: the dual encoder (``mmr train-encoder``)."""

from mm_retrieval.training.encoder import EncoderTrainResult, train_encoder

__all__ = ["EncoderTrainResult", "train_encoder"]
