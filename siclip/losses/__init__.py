"""Losses: CLIP's contrastive loss (and SigLIP's), the Pair-Matching loss, SimCLR's NT-Xent (SLIP); distributed
gathering in one place."""

from .clip_loss import ClipLoss, SigLipLoss, clip_logits
from .gather import distributed_info, gather_features
from .ntxent import NTXentLoss
from .pair_matching import PairMatchingLoss
from .validation import NonFiniteInput, check_pair

__all__ = ["ClipLoss", "NTXentLoss", "NonFiniteInput", "PairMatchingLoss", "SigLipLoss", "check_pair", "clip_logits", "distributed_info",
           "gather_features"]  # fmt: skip
