"""The training task: student, objective and frozen teacher in one module, so DDP, ``torch.compile``
and checkpointing see one object (the pattern timm and open_clip share)."""

from __future__ import annotations

from torch import Tensor, nn

from siclip.distill import SiCLIPObjective


class TrainingTask(nn.Module):
    def __init__(self, student: nn.Module, objective: SiCLIPObjective, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.objective, self.teacher = student, objective, teacher
        if objective.config.needs_teacher and teacher is None:
            raise ValueError("the objective distils from a teacher (feature/relation/interactive > 0) but none was given")

    def forward(self, batch: dict) -> dict[str, Tensor]:
        # The teacher first: its forward's transient activations then never coexist with the student's
        # stored ones (at batch 1536 this is 2 GiB of peak memory).
        teacher = self.teacher(batch) if self.teacher is not None else None
        student = self.student(batch["image"], batch["text"])
        return self.objective(student, teacher)

    def trainable_state(self) -> dict:
        """What a checkpoint keeps: the student and the objective's own parameters, not the frozen teacher."""
        return {"student": self.student.state_dict(), "objective": self.objective.state_dict()}

    def load_trainable_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.objective.load_state_dict(state["objective"])

