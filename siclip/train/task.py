"""The training task: student, objective and frozen teacher in one module, so DDP, ``torch.compile``
and checkpointing see one object (the pattern timm and open_clip share)."""

from __future__ import annotations

from torch import Tensor, nn

from siclip.data import model_pixels
from siclip.distill import SiCLIPObjective


class TrainingTask(nn.Module):
    def __init__(self, student: nn.Module, objective: SiCLIPObjective, teacher: nn.Module | None = None, *,
                 inherited: frozenset[str] = frozenset()) -> None:  # fmt: skip
        super().__init__()
        self.student, self.objective, self.teacher = student, objective, teacher
        self.inherited = inherited  # the student's parameter names that carry the teacher's weights (WI)
        if objective.config.needs_teacher and teacher is None:
            raise ValueError("the objective distils from a teacher (feature/relation/interactive > 0) but none was given")

    def forward(self, batch: dict) -> dict[str, Tensor]:
        # The teacher first: its forward's transient activations then never coexist with the student's
        # stored ones (at batch 1536 this is 2 GiB of peak memory).
        teacher = self.teacher(batch) if self.teacher is not None else None
        # batch["image"] holds uint8 crops: the student normalises them its own way, as the teacher does (FrozenTeacher)
        student = self.student(model_pixels(batch["image"], self.student.preprocess), batch["text"])
        return self.objective(student, teacher)

    def inherited_parameters(self) -> set[str]:
        """Names (in this task, ``student.…``) of the student's parameters inherited from the teacher."""
        return {f"student.{name}" for name in self.inherited}

    def trainable_state(self) -> dict:
        """What a checkpoint keeps: the student and the objective's own parameters, not the frozen teacher."""
        return {"student": self.student.state_dict(), "objective": self.objective.state_dict()}

    def load_trainable_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.objective.load_state_dict(state["objective"])

