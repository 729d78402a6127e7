"""The training task: student, objective and frozen teacher in one module, so DDP, ``torch.compile``
and checkpointing see one object (the pattern timm and open_clip share).

Everything a training step computes runs in :meth:`TrainingTask.forward` — SLIP's extra views through the image tower
and FLIP's token masking inside it included — so the FLOPs of one step measured around it (forward and backward) are
the step's real cost.
"""

from __future__ import annotations

from torch import Tensor, nn

from siclip.blocks.token_dropout import TokenDropout, set_token_dropout
from siclip.data import model_pixels
from siclip.distill import SiCLIPObjective


class TrainingTask(nn.Module):
    def __init__(self, student: nn.Module, objective: SiCLIPObjective, teacher: nn.Module | None = None, *,
                 inherited: frozenset[str] = frozenset(), token_dropout: tuple[TokenDropout, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        self.student, self.objective, self.teacher = student, objective, teacher
        self.inherited = inherited  # the student's parameter names that carry the teacher's weights (WI)
        # FLIP's maskers inside the student's image tower (siclip.blocks.token_dropout.enable_token_dropout); a tuple,
        # not submodules: they are the student's own, and its state dict holds nothing of theirs
        self.token_dropout = tuple(token_dropout)
        self.mask_ratio = max((d.ratio for d in self.token_dropout), default=0.0)
        if objective.config.needs_teacher and teacher is None:
            raise ValueError("the objective distils from a teacher (objective.feature/relation/interactive > 0, as --wikd sets): "
                             "pass --teacher SPEC")  # fmt: skip

    def forward(self, batch: dict) -> dict[str, Tensor]:
        # The teacher first: its forward's transient activations then never coexist with the student's
        # stored ones (at batch 1536 this is 2 GiB of peak memory).
        teacher = self.teacher(batch) if self.teacher is not None else None
        # batch["image"] holds uint8 crops: the student normalises them its own way, as the teacher does (FrozenTeacher)
        student = self.student(model_pixels(batch["image"], self.student.preprocess), batch["text"])
        views = self.self_supervised_views(batch) if self.objective.ssl is not None else None
        return self.objective(student, teacher, views=views)

    def self_supervised_views(self, batch: dict) -> tuple[Tensor, Tensor]:
        """SLIP: the student's image features of the loader's two augmented views ``batch["ssl_images"]`` (B, 2, 3, S, S)
        uint8, each a forward (and later backward) pass of its own through the image tower, as SLIP runs them."""
        if "ssl_images" not in batch:
            raise ValueError("the objective has SLIP's self-supervised term (ssl_scale > 0) but the batch holds no augmented views")
        first, second = batch["ssl_images"].unbind(1)
        return tuple(self.student.encode_image(model_pixels(view, self.student.preprocess)) for view in (first, second))

    def set_masking(self, enabled: bool) -> None:
        """FLIP's token masking on (at its ratio) or off (the unmasked tuning phase at the end of a run)."""
        set_token_dropout(self.token_dropout, self.mask_ratio if enabled else 0.0)

    def inherited_parameters(self) -> set[str]:
        """Names (in this task, ``student.…``) of the student's parameters inherited from the teacher."""
        return {f"student.{name}" for name in self.inherited}

    def trainable_state(self) -> dict:
        """What a checkpoint keeps: the student and the objective's own parameters, not the frozen teacher."""
        return {"student": self.student.state_dict(), "objective": self.objective.state_dict()}

    def load_trainable_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.objective.load_state_dict(state["objective"])

